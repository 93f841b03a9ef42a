"""Verified trajectory synthesis: run the loop, keep only the trajectories that beat one-shot drawing.

Three filters, in the order they apply:

1. **Passive verification.** The graph re-draws a step whose instruction did not execute and records the
   miss as ``accepted=False``; those steps are *dropped* from the kept record (their canvases are never
   copied). A step the loop had to keep although its check failed (retries exhausted) makes the whole
   trajectory unverified, and it is not kept.
2. **Active verification** drives the corrections: that is the loop itself.
3. **Global A/B judge.** The final canvas is compared with a single-step baseline for the same prompt and
   seed (one executor call, mode ``generate``, the loop's first-step seed). ``judge(prompt, loop_image,
   single_image) -> float``; ``> 0`` means the loop wins and only winners are kept (a tie is a loss).
   The default judge compares the controller's own ``verify`` scores (for ShapeWorld: GenEval partial
   credit).

Output folder ``OUT``: ``data-KKKKK-of-NNNNN.jsonl`` (one :class:`~clvr_agent.types.Trajectory` per line,
image paths relative to ``OUT``), ``images/<sha256>.png``, ``done-KKKKK-of-NNNNN.jsonl`` (one line per
prompt tried, kept or not: what resume skips) and ``synth_config.json``. With ``record_calls``, also
``calls-KKKKK-of-NNNNN.jsonl``: every controller call of every prompt tried, kept or not (plan, each
passive check, each verdict, each correction, and the judge's verdicts on the loop's and the single
step's canvases), as :class:`~clvr_agent.tools.conversation.ControllerCall` records whose reply is the
teacher's answer: the data VLM SFT renders with the controller's own renderer. ``merge_shards(OUT)`` writes
``OUT/data.jsonl``; ``datasets.load_dataset("json", data_files=f"{OUT}/data-*.jsonl")`` reads the shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image
from tqdm.auto import tqdm

from clvr_agent.graphs.graph import build_graph
from clvr_agent.seeds import derive_seed, step_seed
from clvr_agent.state import ClvrContext, Settings, validate_prompt
from clvr_agent.store import ArtifactStore
from clvr_agent.tools.conversation import ControllerCall, PlanReply
from clvr_agent.types import ExecutorRequest, ImageRef, Plan, Step, Trajectory, Verdict

# judge(prompt, loop_image, single_image) -> margin; > 0 means the loop's image is better.
Judge = Callable[[str, Image.Image, Image.Image], float]
PROMPT_GENERATORS = ("tiers", "geneval")
# Options that decide which prompts and trajectories a folder holds; a resumed run must repeat them.
_IDENTITY = ("prompts", "seed", "max_tier", "max_iterations", "loop_settings", "backend", "controller")


@dataclass
class SynthConfig:
    """Verified trajectory synthesis on any executor + controller (ShapeWorld on a CPU by default)."""

    out: str = field(default="data/synth", metadata={"help": "Dataset folder (created; resumed when it exists)."})
    n: int = field(default=100, metadata={"help": "Prompts in the whole run (all shards together)."})
    seed: int = field(default=0, metadata={"help": "Seeds the prompt generator and every loop run."})
    prompts: str = field(default="tiers", metadata={"help": "tiers | geneval (the seeded ShapeWorld generators) or a .txt (one prompt a line) / .jsonl ({'prompt': ...}) file."})
    max_tier: int = field(default=8, metadata={"help": "prompts=tiers: prompt i has 1 + i % max_tier atomic constraints."})
    shard: tuple[int, int] = field(default=(0, 1), metadata={"help": "(k, n): run prompts i with i % n == k."})
    max_iterations: int = field(default=8, metadata={"help": "Loop budget per prompt (paper: 8)."})
    loop_settings: dict = field(default_factory=dict, metadata={"help": "Other loop Settings (reference_window, passive_retries, patience, steps, guidance, height, width)."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
    record_calls: bool = field(default=False, metadata={"help": "Also write every controller call and its answer (calls-*.jsonl) for VLM SFT."})

    def __post_init__(self):
        from clvr_agent.tools.shapeworld.language import MAX_TIER

        if self.n < 1:
            raise ValueError(f"n must be ≥ 1 prompt, got {self.n}")
        if len(self.shard) != 2 or not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"shard must be (k, n) with 0 <= k < n, got {self.shard}; e.g. (0, 4) for the first of four")
        self.shard = (int(self.shard[0]), int(self.shard[1]))
        if self.prompts not in PROMPT_GENERATORS and not Path(self.prompts).is_file():
            raise ValueError(f"prompts {self.prompts!r} is neither a generator ({', '.join(PROMPT_GENERATORS)}) nor an existing file")
        if not 1 <= self.max_tier <= MAX_TIER:
            raise ValueError(f"max_tier must be in 1..{MAX_TIER}, got {self.max_tier}")
        if self.max_iterations < 2:
            raise ValueError(f"max_iterations {self.max_iterations} leaves no room for a correction, so the loop can "
                             "never beat the single-step baseline: use 2 or more")
        bad = {"max_iterations", "seed", "artifact_dir", "interactive"} & set(self.loop_settings)
        if bad:
            raise ValueError(f"loop_settings may not set {sorted(bad)}: synthesis chooses those (use max_iterations / seed)")
        Settings(max_iterations=self.max_iterations, **self.loop_settings)  # raises with the field's message


@dataclass
class SynthReport:
    tried: int = 0
    kept: int = 0
    skipped: int = 0  # already done in an earlier (resumed) run
    rejected: dict = field(default_factory=dict)  # reason -> count
    dropped_steps: int = 0  # passive-check misses removed from kept trajectories


# ---------------------------------------------------------------- prompts


def load_prompts(config: SynthConfig) -> list[str]:
    """The run's ``n`` prompts; the generators are prefix-stable (a larger ``n`` extends the same list)."""
    import numpy as np

    from clvr_agent.tools.shapeworld.language import geneval_lines, tier_line

    if config.prompts == "geneval":
        return [line["prompt"] for line in geneval_lines(config.n, config.seed)]
    if config.prompts == "tiers":
        rng = np.random.default_rng(config.seed)
        return [tier_line(1 + i % config.max_tier, rng)["prompt"] for i in range(config.n)]
    path = Path(config.prompts)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        lines = [json.loads(ln)["prompt"] for ln in lines]
    if len(lines) < config.n:
        raise ValueError(f"{path} holds {len(lines)} prompts but n={config.n}: lower n or add prompts")
    return [validate_prompt(p, 2000) for p in lines[: config.n]]


def run_seed(seed: int, index: int) -> int:
    """The loop seed of prompt ``index`` (distinct across base seeds and prompts)."""
    return derive_seed(seed, index)


# ---------------------------------------------------------------- judge


class VerifierJudge:
    """The default A/B judge: the controller's ``verify`` score of each image (loop minus single)."""

    def __init__(self, controller):
        self.controller = controller

    def __call__(self, prompt: str, loop_image: Image.Image, single_image: Image.Image) -> float:
        plan = self.controller.plan(prompt)
        loop = self.controller.verify(prompt, plan, loop_image, []).score
        single = self.controller.verify(prompt, plan, single_image, []).score
        return loop - single


def single_step_image(executor, prompt: str, seed: int, settings: Settings) -> Image.Image:
    """The baseline: one ``generate`` call on the prompt with the loop's first-step seed."""
    request = ExecutorRequest(mode="generate", instruction=prompt, accumulated_prompt=prompt,
                              seed=step_seed(seed, 0), steps=settings.steps, guidance=settings.guidance,
                              height=settings.height, width=settings.width)
    return executor.generate(request, []).image


# ---------------------------------------------------------------- the dataset folder


def shard_name(kind: str, shard: tuple[int, int]) -> str:
    return f"{kind}-{shard[0]:05d}-of-{shard[1]:05d}.jsonl"


def _complete_lines(path: Path) -> list[str]:
    """Lines of a JSONL file another process may be appending to: a last line without its newline is unfinished."""
    text = path.read_text() if path.is_file() else ""
    return [ln for ln in text[: text.rfind("\n") + 1].splitlines() if ln.strip()]


def _repair_tail(path: Path) -> None:
    """Drop a half-written last line (a run killed mid-write) so appends stay valid JSONL."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def done_keys(out: Path) -> set[tuple[str, int]]:
    """(prompt, seed) of every prompt any shard has finished, kept or not."""
    keys = set()
    for f in [*out.glob("done-*.jsonl"), *out.glob("data-*.jsonl")]:
        keys |= {(r["prompt"], r["seed"]) for r in map(json.loads, _complete_lines(f))}
    return keys


def _check_identity(out: Path, identity: dict) -> None:
    path = out / "synth_config.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp-", suffix=".json")  # shards may start together
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(identity, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return
    old = json.loads(path.read_text())
    diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
    if diff:
        k, (was, now) = next(iter(diff.items()))
        raise ValueError(f"{out} was made with {k}={was!r}, not {now!r}: repeat its options to resume, or use a new --out")


def _export_image(ref: ImageRef, out: Path) -> ImageRef:
    """Copy a canvas into ``OUT/images`` (content-addressed, atomic) and point the ref at it, relative to OUT."""
    rel = f"images/{ref.sha256}.png"
    dest = out / rel
    if not dest.exists():
        fd, tmp = tempfile.mkstemp(dir=out / "images", prefix=".tmp-", suffix=".png")
        os.close(fd)
        shutil.copyfile(ref.path, tmp)
        os.replace(tmp, dest)
    return ref.model_copy(update={"path": rel})


def exported_trajectory(traj: Trajectory, out: Path) -> Trajectory:
    """The kept record: steps that passed passive verification, every image copied under OUT."""
    steps = []
    for s in traj.steps:
        if not s.accepted:
            continue
        refs = [_export_image(r, out) for r in s.request.references]
        steps.append(s.model_copy(update={
            "canvas": _export_image(s.canvas, out) if s.canvas else None,
            "request": s.request.model_copy(update={"references": refs}),
        }))
    final = _export_image(traj.final_canvas, out) if traj.final_canvas else None
    return traj.model_copy(update={"steps": steps, "final_canvas": final})


def rejection(traj: Trajectory) -> Optional[str]:
    """Why a loop run cannot be a verified trajectory, or None."""
    if traj.status == "failed":
        return "loop failed"
    if traj.final_canvas is None:
        return "no final image"
    if any(s.accepted and s.passive is not None and not s.passive.executed for s in traj.steps):
        return "unexecuted step kept"
    return None


# ---------------------------------------------------------------- recording the controller's calls


class RecordingController:
    """A controller that answers through ``inner`` and keeps each call as a :class:`ControllerCall`.

    Images are stored content-addressed under ``OUT/images`` (paths relative to OUT); history steps keep
    their canvas and drop their executor references (the renderer never shows them).
    """

    def __init__(self, inner, out: Path):
        self.inner, self.out = inner, Path(out)
        self.name = getattr(inner, "name", type(inner).__name__)
        self.store = ArtifactStore(self.out / "images")
        self.calls: list[ControllerCall] = []

    def _put(self, image: Image.Image) -> ImageRef:
        ref = self.store.put(image)
        return ref.model_copy(update={"path": str(Path(ref.path).relative_to(self.out.resolve()))})

    def _history(self, history: list[Step]) -> list[Step]:
        out = []
        for s in history:
            canvas = _export_image(s.canvas, self.out) if s.canvas is not None else None
            out.append(s.model_copy(update={"canvas": canvas, "request": s.request.model_copy(update={"references": []})}))
        return out

    def plan(self, prompt: str) -> Plan:
        plan = self.inner.plan(prompt)
        reply = PlanReply(constraints=plan.constraints, first_instruction=plan.first_instruction, reasoning=plan.reasoning)
        self.calls.append(ControllerCall(task="plan", prompt=prompt, reply=reply.model_dump_json()))
        return plan

    def check_step(self, instruction: str, before: Optional[Image.Image], after: Image.Image):
        check = self.inner.check_step(instruction, before, after)
        self.calls.append(ControllerCall(task="check", instruction=instruction, reply=check.model_dump_json(),
                                         before=self._put(before) if before is not None else None,
                                         image=self._put(after)))
        return check

    def verify(self, prompt: str, plan: Plan, canvas: Image.Image, history: list[Step]) -> Verdict:
        verdict = self.inner.verify(prompt, plan, canvas, history)
        self.calls.append(ControllerCall(task="verify", prompt=prompt, plan=plan, image=self._put(canvas),
                                         history=self._history(history), reply=verdict.model_dump_json()))
        return verdict

    def correct(self, prompt: str, plan: Plan, verdict: Verdict, canvas: Image.Image, history: list[Step]):
        correction = self.inner.correct(prompt, plan, verdict, canvas, history)
        self.calls.append(ControllerCall(task="correct", prompt=prompt, plan=plan, verdict=verdict,
                                         image=self._put(canvas), history=self._history(history),
                                         reply=correction.model_dump_json()))
        return correction

    def take(self) -> list[ControllerCall]:
        """The calls recorded since the last ``take``."""
        calls, self.calls = self.calls, []
        return calls


# ---------------------------------------------------------------- synthesis


class _Loop:
    """The CLVR graph over live models: each ``invoke`` is one run with its own context copy."""

    def __init__(self, context: ClvrContext) -> None:
        self.context, self.graph = context, build_graph().compile()

    def invoke(self, inputs: dict) -> dict:
        return self.graph.invoke(inputs, context=self.context.for_run())


def synthesize(config: SynthConfig, executor, controller, judge: Optional[Judge] = None) -> SynthReport:
    """Run this shard's prompts through the loop and append the verified winners to ``config.out``."""
    out = Path(config.out)
    identity = {k: v for k, v in asdict(config).items() if k in _IDENTITY}
    identity.update(backend=getattr(executor, "name", type(executor).__name__),
                    controller=getattr(controller, "name", type(controller).__name__))
    _check_identity(out, identity)
    (out / "images").mkdir(parents=True, exist_ok=True)
    data_path, done_path = out / shard_name("data", config.shard), out / shard_name("done", config.shard)
    for own in (data_path, done_path):  # only this shard's files: others may be mid-append
        _repair_tail(own)
    prompts = load_prompts(config)
    recorder = RecordingController(controller, out) if config.record_calls else None
    if recorder is not None:
        calls_path = out / shard_name("calls", config.shard)
        _repair_tail(calls_path)
        controller = recorder  # the loop and the default judge both answer through it
    judge = judge or VerifierJudge(controller)
    finished = done_keys(out)
    k, n_shards = config.shard
    mine = [(i, p, run_seed(config.seed, i)) for i, p in enumerate(prompts) if i % n_shards == k]
    report = SynthReport()
    work = Path(tempfile.mkdtemp(dir=out, prefix=".work-"))
    try:
        settings = Settings(max_iterations=config.max_iterations, artifact_dir=str(work), **config.loop_settings)
        loop = _Loop(ClvrContext(executor=executor, controller=controller, settings=settings))
        data_path.touch()  # an empty shard is still a shard: merging and loading see it
        bar = tqdm(mine, desc=f"synth {k}/{n_shards}", disable=not config.progress)
        for index, prompt, seed in bar:
            if (prompt, seed) in finished:
                report.skipped += 1
                continue
            record = _synthesize_one(loop, executor, judge, prompt, seed, settings, out)
            record["index"] = index
            if recorder is not None:
                meta = {"index": index, "seed": seed, "teacher": recorder.name, "kept": record["kept"]}
                with open(calls_path, "a") as f:
                    f.writelines(c.model_copy(update={"meta": meta}).model_dump_json() + "\n" for c in recorder.take())
            if record.pop("trajectory", None) is not None:
                with open(data_path, "a") as f:
                    f.write(record.pop("line") + "\n")
                report.kept += 1
                report.dropped_steps += record["dropped_steps"]
            else:
                report.rejected[record["reason"]] = report.rejected.get(record["reason"], 0) + 1
            with open(done_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            report.tried += 1
            bar.set_postfix(kept=report.kept, tried=report.tried)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _synthesize_one(loop, executor, judge: Judge, prompt: str, seed: int, settings: Settings, out: Path) -> dict:
    """One prompt: loop, filters, A/B judge. Returns the done-record (+ the kept line when it wins)."""
    result = loop.invoke({"prompt": prompt, "seed": seed})
    traj = Trajectory.model_validate(result["trajectory"])
    record: dict[str, Any] = {"prompt": prompt, "seed": seed, "status": traj.status, "iterations": traj.iterations,
                              "dropped_steps": sum(not s.accepted for s in traj.steps)}
    reason = rejection(traj)
    if reason is None:
        margin = float(judge(prompt, traj.final_canvas.open(), single_step_image(executor, prompt, seed, settings)))
        record["judge"] = margin
        reason = None if margin > 0 else "did not beat single-step"
    if reason is not None:
        return {**record, "kept": False, "reason": reason}
    kept = exported_trajectory(traj, out)
    return {**record, "kept": True, "reason": "", "trajectory": kept, "line": kept.model_dump_json()}


def merge_shards(out: str | Path) -> Path:
    """Write ``OUT/data.jsonl``: every shard's records once, in a fixed order (seed, prompt)."""
    out = Path(out)
    files = sorted(out.glob("data-*.jsonl"))
    if not files:
        raise ValueError(f"{out} holds no data-*.jsonl shards; run `clvr synth --out {out}` first")
    records: dict[tuple, str] = {}
    for f in files:
        for line in _complete_lines(f):
            rec = json.loads(line)
            records.setdefault((rec["seed"], rec["prompt"]), line)
    merged = out / "data.jsonl"
    tmp = out / ".data.jsonl.tmp"
    tmp.write_text("".join(records[key] + "\n" for key in sorted(records)))
    os.replace(tmp, merged)
    return merged

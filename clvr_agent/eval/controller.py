"""``clvr eval controller``: a controller measured as a planner, a verifier and a loop driver on ShapeWorld.

Held-out prompts (GenEval's six tags, ``geneval_lines(n, seed)``) run through the loop three ways on the
same executor: single step, the oracle controller (the ShapeWorld controller: the exact detector that
scores) and the controller under test. The oracle's loops are recorded call by call
(:class:`~clvr_agent.training.synth.RecordingController`); the first ``calls_n`` prompts' calls are then
put to the controller under test with the same inputs, and its answers compared with the oracle's:

- plan: exact match of the checklist (ids, texts, kinds, in order);
- verify: per-constraint agreement with the exact detector, precision and recall of ``satisfied``;
- check: agreement of ``executed`` with the exact passive check;
- correct: usefulness, the fraction of its corrections after which every unmet constraint is met (the
  correction drawn by the executor as the loop would, judged by the exact verifier), beside the oracle's.

A reply that fails validation after the controller's retries counts as a disagreement (and as invalid).
Writes ``summary.json``, ``table.md``, ``loops.jsonl`` (one row per prompt and mode) and ``calls.jsonl``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from clvr_agent.eval.rules import TAGS
from clvr_agent.eval.stats import paired_bootstrap
from clvr_agent.errors import ControllerOutputError
from clvr_agent.tools.conversation import ControllerCall
from clvr_agent.types import Correction, ExecutorRequest, ImageRef, PassiveCheck, Plan, Verdict


def _bar(items, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not progress, file=sys.stderr, leave=False)


def _rate(values: list) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _loop(executor, controller, workdir: Path, max_iterations: int):
    from clvr_agent.app.api import create_clvr
    from clvr_agent.state import ClvrContext, Settings

    settings = Settings(max_iterations=max_iterations, artifact_dir=str(workdir))
    return create_clvr(context=ClvrContext(executor=executor, controller=controller, settings=settings))


def run_loops(lines: list[dict], mode: str, executor, controller, seed: int, workdir: Path, max_iterations: int,
              progress: bool, on_row=None) -> list[dict]:
    """One row per prompt (:func:`clvr_agent.eval.shapeworld.run_lines`), tagged with ``mode``."""
    from clvr_agent.eval.sampling import loop, single_step
    from clvr_agent.eval.shapeworld import run_lines

    sample = single_step(executor) if mode == "single" else loop(_loop(executor, controller, workdir, max_iterations))
    rows = run_lines(lines, sample, seed, progress, f"loop {mode}", on_row=on_row)
    return [{"mode": mode, **row} for row in rows]


def _loop_summary(rows: list[dict]) -> dict:
    per_tag = {t: _rate([r["passed"] for r in rows if r["tag"] == t]) for t in TAGS}
    per_tag = {t: v for t, v in per_tag.items() if v is not None}
    return {"overall": float(np.mean(list(per_tag.values()))) if per_tag else 0.0,
            "pass_rate": _rate([r["passed"] for r in rows]), "per_tag": per_tag,
            "mean_iterations": _rate([r["iterations"] for r in rows]), "n": len(rows),
            "failed_runs": sum(r["status"] == "failed" for r in rows)}


# -------------------------------------------------------------- the controller's answers vs the oracle's


def _ask(fn, *args):
    """(answer, None) or (None, error text) when the controller gives up (invalid replies)."""
    try:
        return fn(*args), None
    except ControllerOutputError as exc:
        return None, str(exc).splitlines()[0][:300]


def compare_call(call: ControllerCall, controller, oracle, executor, tag: str, tier: int,
                 swap: Optional[Image.Image] = None) -> dict:
    """One recorded oracle call put to ``controller``; the row says how its answer compares.

    ``swap`` (verify calls): another prompt's canvas, put to both controllers with this call's prompt, plan and
    history. The exact detector's verdict on it is the truth; a verifier that judges from the text (prompt and
    history) rather than the image answers as it did for the real canvas and disagrees."""
    row = {"task": call.task, "tag": tag, "tier": tier, "prompt": call.prompt}
    if call.task == "plan":
        truth = Plan.model_validate_json(call.reply)
        got, err = _ask(controller.plan, call.prompt)
        same = got is not None and [c.model_dump() for c in got.constraints] == [c.model_dump() for c in truth.constraints]
        return {**row, "invalid": err is not None, "error": err, "exact": same}
    if call.task == "check":
        truth = PassiveCheck.model_validate_json(call.reply)
        before = call.before.open() if call.before is not None else None
        got, err = _ask(controller.check_step, call.instruction, before, call.image.open())
        return {**row, "invalid": err is not None, "error": err, "truth": truth.executed,
                "got": None if got is None else got.executed}
    canvas = call.image.open()
    if call.task == "verify":
        truth = Verdict.model_validate_json(call.reply)
        got, err = _ask(controller.verify, call.prompt, call.plan, canvas, call.history)
        got_ids = {} if got is None else {c.id: c.satisfied for c in got.constraints}
        row = {**row, "invalid": err is not None, "error": err, "truth": truth.satisfied,
               "got": None if got is None else got.satisfied,
               "constraints": [[c.satisfied, got_ids.get(c.id)] for c in truth.constraints]}
        if swap is not None:
            swap_truth = oracle.verify(call.prompt, call.plan, swap, call.history)
            swap_got, _ = _ask(controller.verify, call.prompt, call.plan, swap, call.history)
            swap_ids = {} if swap_got is None else {c.id: c.satisfied for c in swap_got.constraints}
            row["swapped"] = [[c.satisfied, swap_ids.get(c.id)] for c in swap_truth.constraints]
        return row
    truth = Correction.model_validate_json(call.reply)
    got, err = _ask(controller.correct, call.prompt, call.plan, call.verdict, canvas, call.history)
    unmet = [c.id for c in call.verdict.unmet()]
    return {**row, "invalid": err is not None, "error": err, "mode": None if got is None else got.mode,
            "instruction": None if got is None else got.instruction,
            "useful": False if got is None else _fixes(got, call, canvas, unmet, oracle, executor),
            "oracle_useful": _fixes(truth, call, canvas, unmet, oracle, executor)}


def _swapped_canvases(calls: list[ControllerCall]) -> dict[int, ImageRef]:
    """For each verify call (by index), the canvas of the next verify call with another prompt (cyclically)."""
    verify = [i for i, c in enumerate(calls) if c.task == "verify"]
    out = {}
    for k, i in enumerate(verify):
        for j in verify[k + 1:] + verify[:k]:
            if calls[j].prompt != calls[i].prompt:
                out[i] = calls[j].image
                break
    return out


def _fixes(correction: Correction, call: ControllerCall, canvas: Image.Image, unmet: list[str], oracle,
           executor) -> bool:
    """Draw ``correction`` as the loop would (same seed for every controller) and verify it exactly."""
    mode = correction.mode
    refs = [] if mode == "generate" else [canvas]
    request = ExecutorRequest(mode=mode, instruction=correction.instruction, accumulated_prompt=call.prompt,
                              seed=len(call.history) + 7, region=correction.region,
                              region_prompt=correction.region_prompt)
    try:
        image = executor.generate(request, refs).image
    except Exception:  # an instruction the executor cannot carry out fixes nothing
        return False
    verdict = oracle.verify(call.prompt, call.plan, image, [])
    met = {c.id for c in verdict.constraints if c.satisfied}
    return all(u in met for u in unmet)


def _call_summary(rows: list[dict]) -> dict:
    by = defaultdict(list)
    for r in rows:
        by[r["task"]].append(r)
    plan, check, verify, correct = by["plan"], by["check"], by["verify"], by["correct"]
    pairs = [p for r in verify for p in r["constraints"]]
    said_yes = [r for r in verify if r["got"] is True]
    truly_yes = [r for r in verify if r["truth"] is True]
    out = {
        "plan_exact": _rate([r["exact"] for r in plan]),
        "verify_constraint_agreement": _rate([t == g for t, g in pairs]),
        "verify_satisfied_agreement": _rate([r["truth"] == r["got"] for r in verify]),
        "verify_swapped_agreement": _rate([t == g for r in verify for t, g in r.get("swapped", [])]),
        "verify_swapped_unmet_fraction": _rate([not t for r in verify for t, _ in r.get("swapped", [])]),
        # a verifier that ignores the image but is right on every real canvas scores this on the swapped ones
        "verify_swapped_text_only": _rate([a[0] == b[0] for r in verify if "swapped" in r
                                           for a, b in zip(r["constraints"], r["swapped"])]),
        "verify_unchanged_by_swap": _rate([a[1] == b[1] for r in verify if "swapped" in r
                                           for a, b in zip(r["constraints"], r["swapped"])]),
        "satisfied_precision": _rate([r["truth"] for r in said_yes]),
        "satisfied_recall": _rate([r["got"] is True for r in truly_yes]),
        "check_agreement": _rate([r["truth"] == r["got"] for r in check]),
        "correction_useful": _rate([r["useful"] for r in correct]),
        "oracle_correction_useful": _rate([r["oracle_useful"] for r in correct]),
        "invalid": {t: _rate([r["invalid"] for r in by[t]]) for t in ("plan", "check", "verify", "correct")},
        "counts": {t: len(by[t]) for t in ("plan", "check", "verify", "correct")},
        "truly_satisfied_fraction": _rate([r["truth"] for r in verify]),
    }
    out["verify_by_tag"] = {t: _rate([a == b for r in verify if r["tag"] == t for a, b in r["constraints"]]) for t in TAGS}
    out["plan_by_tag"] = {t: _rate([r["exact"] for r in plan if r["tag"] == t]) for t in TAGS}
    return out


# -------------------------------------------------------------- the command


def eval_controller(controller, name: str, n: int = 300, calls_n: int = 60, seed: int = 100,
                    out_dir: str | Path = "eval-controller", backend: str = "shapeworld", max_iterations: int = 8,
                    progress: bool = True) -> dict:
    """Measure ``controller`` (any Controller) against the oracle and single step; write the files, return the summary."""
    from clvr_agent.tools.registry import get_executor
    from clvr_agent.tools.shapeworld.controller import ShapeWorldController
    from clvr_agent.tools.shapeworld.language import geneval_lines
    from clvr_agent.training.synth import RecordingController

    if n < 1 or not 0 <= calls_n <= n:
        raise ValueError(f"need n >= 1 and 0 <= calls_n <= n, got n={n}, calls_n={calls_n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = geneval_lines(n, seed)
    executor = get_executor(backend)
    oracle = ShapeWorldController()
    with tempfile.TemporaryDirectory(prefix="clvr-eval-ctl-") as work:
        work = Path(work)
        recorder = RecordingController(ShapeWorldController(), work / "calls")
        single = run_loops(lines, "single", executor, None, seed, work / "single", max_iterations, progress)
        recorded: list[tuple[ControllerCall, dict]] = []

        def record(i: int, row: dict) -> None:
            calls = recorder.take()
            if i < calls_n:
                recorded.extend((c.resolved(work / "calls"), lines[i]) for c in calls)

        oracle_rows = run_loops(lines, "oracle", executor, recorder, seed, work / "oracle", max_iterations, progress,
                                on_row=record)
        swaps = _swapped_canvases([c for c, _ in recorded])
        call_rows = [compare_call(c, controller, oracle, executor, line["tag"], line["tier"],
                                  swaps[i].open() if i in swaps else None)
                     for i, (c, line) in enumerate(_bar(recorded, "calls", progress))]
        learned = run_loops(lines, "learned", executor, controller, seed, work / "learned", max_iterations, progress)
    loops = {"single": _loop_summary(single), "oracle": _loop_summary(oracle_rows), "learned": _loop_summary(learned)}
    learned_by_tier = {int(t): _rate([r["passed"] for r in learned if r["tier"] == t])
                       for t in sorted({r["tier"] for r in learned})}
    summary = {"controller": name, "backend": backend, "n": n, "calls_n": calls_n, "seed": seed,
               "max_iterations": max_iterations, "loops": loops, "learned_pass_by_tier": learned_by_tier,
               "differences": loop_differences(single, oracle_rows, learned), "calls": _call_summary(call_rows)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "loops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in single + oracle_rows + learned))
    (out / "calls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in call_rows))
    (out / "table.md").write_text(markdown_table(summary))
    return summary


def loop_differences(single: list[dict], oracle: list[dict], learned: list[dict]) -> dict:
    """Paired bootstrap 95 % intervals (by prompt, 2,000 resamples, seed 0) of the overall pass rate's
    differences: learned − single, oracle − single, learned − oracle. Single step draws with the loops'
    first-step seed, so the three modes share each prompt's first canvas."""
    passed = lambda rows: [float(r["passed"]) for r in sorted(rows, key=lambda r: r["index"])]  # noqa: E731
    s, o, lr = passed(single), passed(oracle), passed(learned)
    return {"learned - single": paired_bootstrap(s, lr), "oracle - single": paired_bootstrap(s, o),
            "learned - oracle": paired_bootstrap(o, lr)}


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown_table(s: dict) -> str:
    c, loops = s["calls"], s["loops"]
    lines = [
        f"Controller `{s['controller']}` on `{s['backend']}`, held-out GenEval-style prompts (seed {s['seed']}); "
        f"loops n={s['n']}, calls from the first {s['calls_n']} prompts' oracle loops.",
        "",
        "| loop | overall (GenEval rule) | " + " | ".join(TAGS) + " | mean iterations |",
        "|---|---|" + "---|" * len(TAGS) + "---|",
    ]
    for mode in ("single", "oracle", "learned"):
        row = loops[mode]
        lines.append(f"| {mode} | {_f(row['overall'])} | " + " | ".join(_f(row['per_tag'].get(t)) for t in TAGS)
                     + f" | {_f(row['mean_iterations'])} |")
    diffs = s.get("differences", {})
    if diffs:
        lines += ["", "| difference (paired by prompt) | overall | 95 % CI |", "|---|---|---|"]
        lines += [f"| {k} | {d['diff']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] |" for k, d in diffs.items()]
    lines += [
        "",
        "| call metric | value |",
        "|---|---|",
        f"| plan exact-match (checklist) | {_f(c['plan_exact'])} (n={c['counts']['plan']}) |",
        f"| verify: per-constraint agreement with the exact detector | {_f(c['verify_constraint_agreement'])} (n={c['counts']['verify']} verdicts) |",
        f"| verify on another prompt's canvas (reads the image?): per-constraint agreement | "
        f"{_f(c.get('verify_swapped_agreement'))} (text-only verifier {_f(c.get('verify_swapped_text_only'))}, exact "
        f"1.000; {_f(c.get('verify_swapped_unmet_fraction'))} of them unmet; answers unchanged by the swap "
        f"{_f(c.get('verify_unchanged_by_swap'))}) |",
        f"| verify: precision of `satisfied` | {_f(c['satisfied_precision'])} |",
        f"| verify: recall of `satisfied` | {_f(c['satisfied_recall'])} |",
        f"| passive check agreement | {_f(c['check_agreement'])} (n={c['counts']['check']}) |",
        f"| correction usefulness (oracle's) | {_f(c['correction_useful'])} ({_f(c['oracle_correction_useful'])}) (n={c['counts']['correct']}) |",
        "| invalid replies (plan / check / verify / correct) | " + " / ".join(_f(c['invalid'][t]) for t in ("plan", "check", "verify", "correct")) + " |",
    ]
    return "\n".join(lines) + "\n"

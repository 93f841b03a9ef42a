"""PPRL's records and rollout contexts: the loop states the policy is trained on, and the proxy targets.

A **loop state** (:class:`LoopState`) is one executor call of the loop exactly as the executor receives
it: the accumulated prompt, this step's instruction and mode, and (for an edit) the reference canvases,
the last of which is the canvas being edited. The policy is conditioned on it as at inference.

A **proxy prompt** (:class:`ProxyPrompt`) is a teacher's explicit target for one state: the scene the
step should produce (what R_text judges), the canvases R_ref compares with, and which of their pixels
the step must keep. :func:`plain_proxy` is the no-teacher target: the raw history as it is.

:func:`load_loop_states` turns a ``clvr synth`` folder into loop states; :func:`split_heldout` keeps a
few runs apart for the held-out reward curve. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

MODES = ("generate", "edit")  # region draws (mode "inpaint") draw a lone object from their own prompt: not edits


@dataclass(frozen=True)
class LoopState:
    """One executor call of the loop (an ``ExecutorRequest`` whose canvases are PNG files).

    ``references`` is empty for ``generate`` (the executor passes no canvas then); ``key`` names the run
    the state comes from, so a held-out split keeps a run's states together.
    """

    prompt: str  # the accumulated prompt: line 1 the user's prompt, then every instruction so far
    instruction: str = ""
    mode: str = "generate"
    references: tuple[str, ...] = ()
    key: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"a PPRL loop state is a generate or edit call, got mode {self.mode!r}; drop region draws")
        if self.mode == "edit" and not self.references:
            raise ValueError("an edit state needs its reference canvases (the last is the one being edited)")

    def canvases(self) -> list[Image.Image]:
        """The reference canvases, RGB, oldest first."""
        out = []
        for p in self.references:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out


@dataclass
class ProxyPrompt:
    """A teacher's explicit target for one loop state.

    ``text``: the scene the step should produce, as a prompt R_text reads. ``references``: the canvases
    R_ref compares with (the last is the one being edited); empty = nothing to preserve, R_ref unused.
    ``preserve``: ``(H, W)`` bool over the last reference's pixels the step must keep; None = all of them.
    """

    text: str
    references: list[Image.Image] = field(default_factory=list)
    preserve: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.preserve is not None:
            if not self.references:
                raise ValueError("a preserve mask needs the reference canvas it is over")
            size = self.references[-1].size
            if self.preserve.shape != (size[1], size[0]) or self.preserve.dtype != bool:
                raise ValueError(f"preserve must be a bool (H, W) = {(size[1], size[0])} mask over the last reference, "
                                 f"got {self.preserve.dtype} {self.preserve.shape}")


def policy_input(context: Any) -> tuple[str, list[Image.Image]]:
    """What the executor conditions on for ``context``: (prompt text, reference canvases)."""
    if isinstance(context, str):
        return context, []
    if isinstance(context, LoopState):
        return context.prompt, context.canvases() if context.mode == "edit" else []
    raise TypeError(f"a PPRL context is a prompt string or a LoopState, got {type(context).__name__}")


def plain_proxy(context: Any) -> ProxyPrompt:
    """The no-teacher proxy ("simple RL"): the raw history as the target, all of the last canvas to keep.

    A prompt string as is; a :class:`LoopState`'s accumulated prompt and references; a
    ``{'prompt', 'references'}`` record's prompt and reference PNGs.
    """
    if isinstance(context, str):
        return ProxyPrompt(context)
    if isinstance(context, LoopState):
        return ProxyPrompt(*policy_input(context))
    if isinstance(context, dict) and "prompt" in context:
        refs = []
        for p in context.get("references", []):
            with Image.open(p) as im:
                refs.append(im.convert("RGB"))
        return ProxyPrompt(str(context["prompt"]), refs)
    raise TypeError(f"plain_proxy takes a prompt string, a LoopState or a {{'prompt', 'references'}} record, "
                    f"got {type(context).__name__}")


def context_key(context: Any) -> str:
    """The run a context belongs to (a prompt string is its own run)."""
    return context if isinstance(context, str) else (context.key or context.prompt.split("\n")[0])


# ---------------------------------------------------------------- a synth folder -> loop states


def load_loop_states(folder: str | Path, *, modes: Sequence[str] = MODES) -> list[LoopState]:
    """Every ``generate``/``edit`` call the loop made in a ``clvr synth`` folder, in the order it made them.

    With recorded calls (``--record-calls``: every prompt tried, kept or not, failed edits included) the
    states are rebuilt from the plan and each correction by the graph's own ``build_request`` (so the
    accumulated prompt and the K reference canvases are exactly what the executor got); without, they
    are the kept trajectories' steps (passive-verified steps of winning runs only).
    """
    folder = Path(folder)
    if not (folder / "synth_config.json").is_file():
        raise ValueError(f"{folder} is not a `clvr synth` folder (no synth_config.json); make one with "
                         f"`clvr synth --out {folder} --record-calls ...`")
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"modes {bad}: a PPRL state is one of {', '.join(MODES)}")
    calls = sorted(folder.glob("calls-*.jsonl"))
    states = _states_from_calls(folder, calls) if calls else _states_from_trajectories(folder)
    states = [s for s in states if s.mode in modes]
    if not states:
        raise ValueError(f"{folder} holds no {'/'.join(modes)} loop states; synthesize more prompts")
    return states


def _states_from_calls(folder: Path, files: list[Path]) -> list[LoopState]:
    from clvr_agent.graphs.graph import build_request
    from clvr_agent.state import ClvrContext
    from clvr_agent.tools.conversation import ControllerCall, PlanReply
    from clvr_agent.types import Correction

    settings = json.loads((folder / "synth_config.json").read_text()).get("loop_settings", {})
    context = ClvrContext(**settings)
    out, planned = [], set()
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            call = ControllerCall.model_validate_json(line)
            if call.task not in ("plan", "correct"):
                continue
            seed = int(call.meta.get("seed", 0))
            key = f"{seed}:{call.prompt}"
            if call.task == "plan":
                if key in planned:  # the A/B judge plans again after the loop: not an executor call
                    continue
                planned.add(key)
                pending = Correction(instruction=PlanReply.model_validate_json(call.reply).first_instruction, mode="generate")
                history = []
            else:
                pending, history = Correction.model_validate_json(call.reply), call.history
            if pending.mode == "inpaint":
                continue
            state = {"prompt": call.prompt, "seed": seed, "steps": history, "pending": pending, "init_references": []}
            out.append(_state(build_request(state, context), folder, key))
    return out


def _states_from_trajectories(folder: Path) -> list[LoopState]:
    from clvr_agent.types import Step

    files = [folder / "data.jsonl"] if (folder / "data.jsonl").is_file() else sorted(folder.glob("data-*.jsonl"))
    out = []
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for raw in rec["steps"]:
                step = Step.model_validate(raw)
                if step.request.mode != "inpaint":
                    out.append(_state(step.request, folder, f"{rec['seed']}:{rec['prompt']}"))
    return out


def _state(request, folder: Path, key: str) -> LoopState:
    refs = tuple(str(folder / r.path) for r in request.references) if request.mode == "edit" else ()
    return LoopState(prompt=request.accumulated_prompt, instruction=request.instruction, mode=request.mode,
                     references=refs, key=key)


def split_heldout(contexts: Sequence[Any], runs: int) -> tuple[list, list]:
    """(train, held out): every state of the last ``runs`` runs is held out, so no held-out run is trained on."""
    keys = list(dict.fromkeys(context_key(c) for c in contexts))
    if runs < 0 or runs >= len(keys):
        raise ValueError(f"cannot hold out {runs} of {len(keys)} runs: keep at least one run to train on")
    held = set(keys[len(keys) - runs:])
    return [c for c in contexts if context_key(c) not in held], [c for c in contexts if context_key(c) in held]

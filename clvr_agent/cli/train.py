"""``clvr train sft-diffusion | distill | pprl | sft-vlm``: one flag per config field, plus a JSON config file.

Precedence: the config dataclass's defaults < ``--config file.json`` < flags. ``--model`` is a diffusers
folder (``Flux2KleinPipeline``; for ``sft-vlm`` a Qwen3-VL folder or hub id), ``--out`` the output folder
(the config's ``output_dir``). The flags are built from the dataclass fields (all four configs share
``TrainConfig``), so a field has one spelling in every subcommand and a new field is a new flag; nothing
here imports torch until a command runs. Multi-GPU: ``accelerate launch -m clvr_agent.cli train …`` with
the same flags.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Callable, Optional

import typer

from clvr_agent.cli.common import fail

from clvr_agent.training.diffusion_configs import DistillConfig, PPRLConfig, SFTDiffusionConfig
from clvr_agent.training.vlm_config import SFTVLMConfig

train_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train FLUX.2 klein and the Qwen3-VL controller: SFT, distillation, PPRL.")

_COMMON = {"output_dir", "resume"}  # spelled --out and --resume


def _option_type(tp):
    if tp in (int, float, str, bool):
        return tp
    return str  # tuples: comma-separated


def _field_params(config_cls) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(config_cls)
    params = []
    for f in dataclasses.fields(config_cls):
        if f.name in _COMMON:
            continue
        tp = _option_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{f.name.replace('_', '-')}"] if tp is bool else [flag]
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[tp],
            default=typer.Option(None, *decls, help=f"{f.metadata.get('help', '')} [default: {shown}]", show_default=False),
        ))
    return params


def _build_config(config_cls, config_file: Optional[Path], out: Optional[Path], resume: bool, flags: dict):
    values: dict = {}
    if config_file is not None:
        if not config_file.is_file():
            fail(f"--config: file not found: {config_file}")
        try:
            values = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            fail(f"--config: {config_file} is not JSON ({exc.msg} at line {exc.lineno})")
        if not isinstance(values, dict):
            fail(f"--config: {config_file} must hold a JSON object of config fields")
        names = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            fail(f"--config: unknown field(s) {', '.join(unknown)}; see --help for the fields")
    hints = typing.get_type_hints(config_cls)
    for name, value in flags.items():
        if value is None:
            continue
        if hints[name] is not str and isinstance(value, str):  # tuple fields arrive as "9,18,27"
            try:
                value = tuple(int(v) for v in value.split(",") if v.strip())
            except ValueError:
                fail(f"--{name.replace('_', '-')}: expected comma-separated integers, got {value!r}")
        values[name] = value
    if out is not None:
        values["output_dir"] = str(out)
    if resume:
        values["resume"] = True
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as exc:
        fail(str(exc))


def _load_pipeline(model: Path, cfg):
    """The klein folder as a pipeline; ``height = width = 0`` takes the folder's ``clvr_canvas.json``
    draw size if it has one (the trainer otherwise takes the pipeline's native size)."""
    if not (model / "model_index.json").is_file():
        fail(f"--model: {model} is not a diffusers folder (no model_index.json)")
    from diffusers import Flux2KleinPipeline

    from clvr_agent.tools.flux2_klein import canvas_config

    draw = canvas_config(model).get("draw_size")
    if not cfg.height and draw:
        cfg.height = cfg.width = int(draw)
    return Flux2KleinPipeline.from_pretrained(str(model))


def _read_prompts(path: Path) -> list:
    """Prompts from a .txt (one per line) or .jsonl (records with "prompt" and optional "references")."""
    if not path.is_file():
        fail(f"--prompts: file not found: {path}")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return [ln.strip() for ln in lines]
    items = []
    for n, ln in enumerate(lines, 1):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            fail(f"{path}:{n}: not JSON")
        if "prompt" not in rec:
            fail(f"{path}:{n}: a record needs a \"prompt\"")
        refs = [str(p if Path(p).is_absolute() else path.parent / p) for p in rec.get("references", [])]
        items.append({"prompt": rec["prompt"], "references": refs})
    if not items:
        fail(f"--prompts: {path} holds no prompts")
    return items


def _command(name: str, config_cls, extra: list[inspect.Parameter], run: Callable, help_text: str, *,
             app: typer.Typer = train_app, model_type=Path, model_help: str = "Diffusers folder of the model to train."):
    """Register a command whose signature is the common options + ``extra`` + one option per config field."""
    common = [
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=model_type,
                          default=typer.Option(..., "--model", help=model_help)),
        inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--out", help="Output folder (config output_dir).")),
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="JSON object of config fields; flags override it.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out.")),
    ]
    fields = _field_params(config_cls)
    field_names = {p.name for p in fields}

    def command(**kwargs):
        flags = {k: kwargs.pop(k) for k in list(kwargs) if k in field_names}
        cfg = _build_config(config_cls, kwargs.pop("config_file"), kwargs.pop("out"), kwargs.pop("resume"), flags)
        try:
            history = run(cfg, **kwargs)
        except (ValueError, FileNotFoundError, OSError) as exc:
            fail(str(exc).splitlines()[0])
        last = history[-1] if history else {}
        typer.echo(json.dumps({"out": cfg.output_dir, "steps": last.get("step", 0),
                               **{k: v for k, v in last.items() if k != "step"}}, default=str))

    command.__signature__ = inspect.Signature(common + extra + fields)
    command.__doc__ = help_text
    app.command(name)(command)


def _opt(name: str, annotation, *decls: str, default=..., help: str = "") -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, help=help))


def _run_sft(cfg, *, model: Path, data: Path):
    from clvr_agent.training.sft_diffusion import SFTDiffusionDataset, SFTDiffusionTrainer

    dataset = SFTDiffusionDataset.from_jsonl(data)
    return SFTDiffusionTrainer(_load_pipeline(model, cfg), cfg, dataset).train()


def _run_distill(cfg, *, model: Path, prompts: Path):
    from clvr_agent.training.distill import DistillTrainer

    items = _read_prompts(prompts)
    return DistillTrainer(_load_pipeline(model, cfg), cfg, items).train()


REWARDS = ("shapeworld", "brightness")
PROXIES = ("shapeworld", "plain")


def _brightness(images, proxies):
    import numpy as np

    return [float(np.asarray(im.convert("L"), dtype=np.float32).mean() / 255) for im in images]


def _read_contexts(path: Path) -> list:
    """PPRL contexts: a `clvr synth` folder's loop states, or a prompt file (a .jsonl record with references
    is an edit of its last reference)."""
    from clvr_agent.training.pprl_data import LoopState, load_loop_states

    if path.is_dir():
        return load_loop_states(path)
    items = _read_prompts(path)
    return [it if isinstance(it, str) else
            LoopState(prompt=it["prompt"], instruction=it["prompt"].split("\n")[-1], references=tuple(it["references"]),
                      mode="edit" if it["references"] else "generate")
            for it in items]


def _run_pprl(cfg, *, model: Path, prompts: Path, reward: str, proxy: str, heldout_runs: int):
    from clvr_agent.training.pprl import PPRLTrainer, plain_proxy, preservation_reward
    from clvr_agent.training.pprl_data import split_heldout
    from clvr_agent.training.pprl_shapeworld import ShapeWorldTeacher, shapeworld_reward

    if reward not in REWARDS:
        fail(f"--reward {reward!r}: choose one of {', '.join(REWARDS)}")
    if proxy not in PROXIES:
        fail(f"--proxy {proxy!r}: choose shapeworld (the proxy teacher) or plain (the raw history: the simple-RL row)")
    contexts = _read_contexts(prompts)
    if reward == "shapeworld":
        from clvr_agent.tools.shapeworld.language import parse_prompt

        for item in contexts:
            text = (item if isinstance(item, str) else item.prompt).split("\n")[0]
            try:
                parse_prompt(text)
            except ValueError as exc:
                fail(f"--reward shapeworld needs ShapeWorld prompts; {text!r}: {exc}")
    train, heldout = split_heldout(contexts, heldout_runs) if heldout_runs else (contexts, [])
    reward_text = {"shapeworld": shapeworld_reward, "brightness": _brightness}[reward]
    teacher = ShapeWorldTeacher() if proxy == "shapeworld" else plain_proxy
    # The held-out curve is always scored against the teacher's targets, so proxy and plain runs compare.
    trainer = PPRLTrainer(_load_pipeline(model, cfg), cfg, train, reward_text, preservation_reward, teacher,
                          heldout=heldout, eval_prompter=ShapeWorldTeacher() if reward == "shapeworld" else None)
    return trainer.train()


_command("sft-diffusion", SFTDiffusionConfig,
         [_opt("data", Path, "--data", help="JSONL of {prompt, references, target} records or trajectory records.")],
         _run_sft, "Flow-matching SFT on (accumulated prompt, reference canvases, target canvas).")
_command("distill", DistillConfig,
         [_opt("prompts", Path, "--prompts", help=".txt (one prompt a line) or .jsonl ({prompt, references}).")],
         _run_distill, "Distil a base (CFG) model into a few-step student; saved with is_distilled=True.")
_command("pprl", PPRLConfig,
         [_opt("prompts", Path, "--prompts",
               help="A `clvr synth` folder (its loop states: every generate/edit call, rebuilt from --record-calls "
                    "when present), or .txt (one prompt a line) / .jsonl ({prompt, references}: an edit of the last)."),
          _opt("reward", str, "--reward", default="shapeworld",
               help="R_text: shapeworld (GenEval partial credit of the target scene × a penalty for extra objects, "
                    "ShapeWorld detector) or brightness (a toy)."),
          _opt("proxy", str, "--proxy", default="shapeworld",
               help="The step target: shapeworld (the proxy teacher: the canvas's scene with the instruction applied, "
                    "and what to preserve) or plain (the raw history: the simple-RL row)."),
          _opt("heldout_runs", int, "--heldout-runs", default=0,
               help="Hold out every state of the last N runs for the held-out reward curve (needs --eval-every).")],
         _run_pprl, "Proxy-prompt RL (Flow-GRPO) with R = w·R_text + (1-w)·R_ref (R_ref: preservation outside the edited region).")


def _run_sft_vlm(cfg, *, model: str, data: Path, dtype: str, full: bool):
    from clvr_agent.tools.qwen3_vl import load_qwen3_vl
    from clvr_agent.training.sft_vlm import SFTVLMTrainer, TrajectoryDialogueDataset

    if full and cfg.lora_rank:
        raise ValueError("--full asks for a full fine-tune: drop it or --lora-rank")

    dataset = TrajectoryDialogueDataset.from_path(data, dialogue=cfg.dialogue, image_size=cfg.image_size,
                                                  history_token_budget=cfg.history_token_budget,
                                                  history_images=cfg.history_images)
    vlm, processor = load_qwen3_vl(model, torch_dtype=dtype, device="cpu")  # accelerate places it
    return SFTVLMTrainer(vlm, processor, cfg, dataset).train()


def register_sft_vlm(app: typer.Typer) -> None:
    """``clvr train sft-vlm`` (added by ``cli_data.register_train``, next to ``clvr synth`` that feeds it)."""
    _command("sft-vlm", SFTVLMConfig,
             [_opt("data", Path, "--data", help="A `clvr synth` folder (or a trajectory .jsonl)."),
              _opt("dtype", str, "--dtype", default="float32", help="Weights dtype when loading (float32 keeps AdamW exact)."),
              # The old spelling of --lora-rank 0 (the default), kept because scripts/clvr_mini/gpu_vlm.sh uses it.
              inspect.Parameter("full", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                default=typer.Option(False, "--full", hidden=True))],
             _run_sft_vlm, "Supervised fine-tuning of the Qwen3-VL controller on synthesized trajectories (assistant-only loss).",
             app=app, model_type=str, model_help="Qwen3-VL to fine-tune: a local folder or a hub id.")

"""VLM SFT: Qwen3-VL on the controller's side of verified trajectories, loss on assistant turns only.

The data are controller calls (:class:`~clvr_agent.tools.conversation.ControllerCall`): recorded by
``clvr synth --record-calls`` (``calls-*.jsonl``, every call of the teacher with its answer), or, for a
folder of trajectories only, read back from each ``Trajectory`` (plan, step check, verify, correct). The
assistant reply is the JSON record the controller parses (``PlanReply``, ``PassiveCheck``, ``Verdict``,
``Correction``). Two renderings:

- ``dialogue="calls"`` (default): every call as its own conversation, rendered by the controller's own
  renderer (:mod:`clvr_agent.tools.conversation`) with the controller's settings (``image_size``,
  ``history_token_budget``, ``history_images``): exactly the messages it sends at inference in text mode.
- ``dialogue="trajectory"``: one interleaved multi-turn dialogue per trajectory: the controller's role as the
  system turn, then for every call a user turn (the task paragraph of that call's system prompt, its user
  text and canvases where they occur) and the assistant's reply. Not what inference sends; kept for
  experiments with multi-turn controllers.

The collator applies the processor's chat template, so images expand to their real token counts where
they occur, and sets labels to -100 everywhere except each assistant span: from after
``<|im_start|>assistant\\n`` through the ``<|im_end|>`` that ends the turn (Qwen's own recipe).

Shared prefix (``share_prefix``, on by default in a single process): every conversation of one task starts
with the same system text (role, task, JSON schema: ~450 of ~510 tokens of a plan call), so the trainer groups
each step's conversations by system text into micro-batches and runs the tokens all rows of a micro-batch
share (before any label and any image) once, as one row whose key/value cache the rows then attend to. The
loss and the gradients are those of the plain forward (a test compares them); only the repeated work goes.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Sequence

from PIL import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch is imported where it is used, not at import time
    import torch

from clvr_agent.tools import prompts
from clvr_agent.tools.conversation import (
    ControllerCall,
    PlanReply,
    RenderOptions,
    constraint_lines,
    downscale,
    render_history,
    training_conversation,
)
from clvr_agent.types import Correction, ImageRef, PassiveCheck, Step, Trajectory, Verdict
from clvr_agent.training import checkpointing as ck
from clvr_agent.training.diffusion_loop import append_log
from clvr_agent.training.vlm_config import LORA_TARGET_MODULES, SFTVLMConfig  # noqa: F401 (re-exported)
from clvr_agent.seeds import derive_seed

IGNORE_INDEX = -100
TASKS = {  # task -> (system prompt at inference, reply schema)
    "plan": (prompts.PLAN_SYSTEM, PlanReply),
    "check": (prompts.CHECK_SYSTEM, PassiveCheck),
    "verify": (prompts.VERIFY_SYSTEM, Verdict),
    "correct": (prompts.CORRECT_SYSTEM, Correction),
}


# ---------------------------------------------------------------- trajectories -> controller calls


@dataclass
class Exchange:
    """One controller call: its task, the user content (text blocks and image paths) and the reply text."""

    task: Literal["plan", "check", "verify", "correct"]
    user: list[dict]  # {"type": "text", "text": ...} | {"type": "image", "path": ...}
    reply: str
    call: Optional[ControllerCall] = None  # the same call as data, for the controller's renderer ("calls")


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _image(ref: ImageRef, root: Path) -> dict:
    path = Path(ref.path)
    return {"type": "image", "path": str(path if path.is_absolute() else root / path)}


def _history_text(history: Sequence[Step], budget: int) -> str:
    """The controller's history text (the one renderer's, without canvases): newest lines that fit
    the token budget, oldest first."""
    return render_history(history, None, RenderOptions(history_token_budget=budget, history_images=0))[0]


def trajectory_exchanges(traj: Trajectory, root: Path, *, history_token_budget: int = 2048) -> list[Exchange]:
    """The controller calls of one trajectory, in the order the loop made them.

    Steps without a canvas or with an error are skipped; a fallback plan (the controller failed) is not a
    target. The correction after a verified step is read back from the next iteration's first step.
    """
    plan = traj.plan
    out: list[Exchange] = []
    if plan is not None and not plan.fallback:
        reply = PlanReply(constraints=plan.constraints, first_instruction=plan.first_instruction, reasoning=plan.reasoning)
        out.append(Exchange("plan", [_text(prompts.PLAN_USER.format(prompt=traj.prompt))], reply.model_dump_json(),
                            ControllerCall(task="plan", prompt=traj.prompt, reply=reply.model_dump_json())))
    steps = [s for s in traj.steps if s.canvas is not None and s.error is None]
    for i, step in enumerate(steps):
        if step.passive is not None:
            refs = step.request.references
            before = None if step.request.mode == "generate" or not refs else refs[-1]
            user = [_text(prompts.CHECK_USER.format(instruction=step.instruction))]
            if before is None:
                user.append(_text(prompts.CHECK_NO_BEFORE))
            else:
                user += [_text(prompts.BEFORE_LABEL), _image(before, root)]
            user += [_text(prompts.AFTER_LABEL), _image(step.canvas, root)]
            call = ControllerCall(task="check", instruction=step.instruction, before=before, image=step.canvas,
                                  reply=step.passive.model_dump_json()).resolved(root)
            out.append(Exchange("check", user, step.passive.model_dump_json(), call))
        if step.verdict is None or plan is None:
            continue
        prior = [s for s in steps[:i] if s.accepted]  # the graph's accepted_canvases(steps[:-1])
        text = prompts.VERIFY_USER.format(prompt=traj.prompt, constraints=constraint_lines(plan.constraints),
                                          history=_history_text(prior, history_token_budget))
        call = ControllerCall(task="verify", prompt=traj.prompt, plan=plan, image=step.canvas, history=prior,
                              reply=step.verdict.model_dump_json()).resolved(root)
        out.append(Exchange("verify", [_text(text), _text(prompts.CURRENT_CANVAS_LABEL), _image(step.canvas, root)],
                            step.verdict.model_dump_json(), call))
        nxt = next((s for s in steps[i + 1:] if s.iteration == step.iteration + 1), None)
        if nxt is None or not step.accepted:
            continue
        unmet_ids = {c.id for c in step.verdict.unmet()}
        unmet = [c for c in plan.constraints if c.id in unmet_ids]
        history = steps[: i + 1]
        text = prompts.CORRECT_USER.format(
            prompt=traj.prompt, constraints=constraint_lines(plan.constraints),
            unmet=constraint_lines(unmet) if unmet else prompts.HISTORY_EMPTY,
            summary=step.verdict.summary or prompts.HISTORY_EMPTY,
            history=_history_text(history, history_token_budget),
            width=step.canvas.width, height=step.canvas.height,
        )
        correction = Correction(instruction=nxt.instruction, mode=nxt.request.mode,
                                reasoning=nxt.reasoning, region=nxt.request.region,
                                region_prompt=nxt.request.region_prompt)
        call = ControllerCall(task="correct", prompt=traj.prompt, plan=plan, verdict=step.verdict, image=step.canvas,
                              history=history, reply=correction.model_dump_json()).resolved(root)
        out.append(Exchange("correct", [_text(text), _text(prompts.CURRENT_CANVAS_LABEL), _image(step.canvas, root)],
                            correction.model_dump_json(), call))
    return out


def task_paragraph(task: str) -> str:
    """The part of a task's system prompt after the shared controller role ("Task: ...")."""
    system = TASKS[task][0]
    if not system.startswith(prompts.CONTROLLER_ROLE):
        raise ValueError(f"the {task} system prompt no longer starts with CONTROLLER_ROLE; update task_paragraph")
    return system[len(prompts.CONTROLLER_ROLE):].strip()


def render_dialogues(exchanges: Sequence[Exchange], dialogue: str,
                     opts: RenderOptions = RenderOptions()) -> list[list[dict]]:
    """Chat-format conversations for ``dialogue`` = "trajectory" (images as paths) or "calls" (the
    controller's renderer with ``opts``: images as downscaled pixels)."""
    if dialogue == "trajectory":
        conv = [{"role": "system", "content": prompts.CONTROLLER_ROLE}]
        for ex in exchanges:
            conv.append({"role": "user", "content": [_text(task_paragraph(ex.task)), *ex.user]})
            conv.append({"role": "assistant", "content": ex.reply})
        return [conv] if exchanges else []
    if dialogue == "calls":
        return [training_conversation(ex.call, opts) for ex in exchanges]
    raise ValueError(f"dialogue must be 'trajectory' or 'calls', got {dialogue!r}")


# ---------------------------------------------------------------- dataset


def trajectory_files(data: str | Path) -> list[Path]:
    """A JSONL file, or a synth folder: its shards ``data-*.jsonl`` (always current), else its ``data.jsonl``."""
    path = Path(data)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"no trajectory data at {path}: give a synth folder or a .jsonl file")
    files = sorted(path.glob("data-*.jsonl")) or sorted(path.glob("data.jsonl"))
    if not files:
        raise ValueError(f"{path} holds no data-*.jsonl or data.jsonl; run `clvr synth --out {path}` first")
    return files


def load_trajectories(data: str | Path) -> list[tuple[Trajectory, Path]]:
    """Every record as ``(trajectory, folder its relative image paths resolve against)``."""
    out = []
    for f in trajectory_files(data):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append((Trajectory.model_validate_json(line), f.parent))
                except ValueError as exc:
                    raise ValueError(f"{f}:{n}: not a trajectory record ({str(exc).splitlines()[0]})") from None
    return out


def call_files(data: str | Path) -> list[Path]:
    """Every ``calls-*.jsonl`` (``clvr synth --record-calls``) in a folder and its subfolders; [] if none."""
    path = Path(data)
    return sorted(path.rglob("calls-*.jsonl")) if path.is_dir() else []


def load_calls(data: str | Path) -> list[ControllerCall]:
    """Every recorded call, image paths resolved. A plan asked twice for one prompt (the judge re-plans) is kept once."""
    out, plans = [], set()
    for f in call_files(data):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                call = ControllerCall.model_validate_json(line)
            except ValueError as exc:
                raise ValueError(f"{f}:{n}: not a controller call record ({str(exc).splitlines()[0]})") from None
            if call.task == "plan":
                if (call.prompt, call.reply) in plans:
                    continue
                plans.add((call.prompt, call.reply))
            out.append(call.resolved(f.parent))
    return out


class TrajectoryDialogueDataset:
    """Conversations (chat format) for SFT; item ``i`` is one conversation.

    Built from conversations, or (:meth:`from_path`) from a synth folder: its recorded calls when it has
    any, else the calls read back from its trajectories.
    """

    def __init__(self, conversations: Sequence[list[dict]]):
        if not conversations:
            raise ValueError("the SFT dataset is empty: the trajectories hold no controller calls to learn")
        self.conversations = list(conversations)

    @classmethod
    def from_trajectories(cls, records: Sequence[tuple[Trajectory, Path]], *, dialogue: str = "calls",
                          image_size: int = 512, history_token_budget: int = 2048,
                          history_images: int = 2) -> "TrajectoryDialogueDataset":
        exchanges = [trajectory_exchanges(traj, root, history_token_budget=history_token_budget)
                     for traj, root in records]
        if dialogue == "calls":
            opts = RenderOptions(image_size=image_size, history_token_budget=history_token_budget,
                                 history_images=history_images)
            return ControllerCallDataset([e.call for ex in exchanges for e in ex], opts)
        return cls([conv for ex in exchanges for conv in render_dialogues(ex, dialogue)])

    @classmethod
    def from_path(cls, data: str | Path, *, dialogue: str = "calls", image_size: int = 512,
                  history_token_budget: int = 2048, history_images: int = 2) -> "TrajectoryDialogueDataset":
        if dialogue == "calls" and call_files(data):
            opts = RenderOptions(image_size=image_size, history_token_budget=history_token_budget,
                                 history_images=history_images)
            return ControllerCallDataset(load_calls(data), opts)
        return cls.from_trajectories(load_trajectories(data), dialogue=dialogue, image_size=image_size,
                                     history_token_budget=history_token_budget, history_images=history_images)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> list[dict]:
        return self.conversations[i]


class ControllerCallDataset(TrajectoryDialogueDataset):
    """Controller calls rendered on access by the controller's own renderer (images are opened per item)."""

    def __init__(self, calls: Sequence[ControllerCall], opts: RenderOptions):
        if not calls:
            raise ValueError("the SFT dataset is empty: the data hold no controller calls to learn")
        self.calls, self.opts = list(calls), opts

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, i: int) -> list[dict]:
        return training_conversation(self.calls[i], self.opts)


# ---------------------------------------------------------------- collator


class AssistantOnlyCollator:
    """Tokenizes conversations with the processor's chat template; labels only on assistant spans.

    Images are opened here (``path`` blocks), downscaled like the controller's (longer side ``image_size``)
    and handed to the processor in the order they occur. Returns ``input_ids``, ``attention_mask``,
    ``labels`` (right-padded) and the processor's image tensors.
    """

    def __init__(self, processor, *, image_size: int = 512, max_length: Optional[int] = None):
        self.processor, self.image_size, self.max_length = processor, image_size, max_length
        tok = processor.tokenizer
        self.header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.end_id
        if self.end_id is None or self.end_id == tok.unk_token_id:
            raise ValueError("the tokenizer has no <|im_end|> token: this collator needs a Qwen-style chat template")

    def _with_pixels(self, conv: list[dict]) -> list[dict]:
        out = []
        for msg in conv:
            content = msg["content"]
            if not isinstance(content, str):
                content = [self._open(b) if b["type"] == "image" else b for b in content]
            out.append({"role": msg["role"], "content": content})
        return out

    def _open(self, block: dict) -> dict:
        if "image" in block:  # already pixels: rendered by the controller's renderer at its image_size
            return {"type": "image", "image": downscale(block["image"], self.image_size)}
        with Image.open(block["path"]) as im:
            return {"type": "image", "image": downscale(im, self.image_size)}

    def assistant_labels(self, input_ids: list[int]) -> list[int]:
        """-100 everywhere except after each ``<|im_start|>assistant\\n`` through its ``<|im_end|>``."""
        labels = [IGNORE_INDEX] * len(input_ids)
        h, i = len(self.header), 0
        while i + h <= len(input_ids):
            if input_ids[i:i + h] != self.header:
                i += 1
                continue
            j = i + h
            while j < len(input_ids) and input_ids[j] != self.end_id:
                labels[j] = input_ids[j]
                j += 1
            if j < len(input_ids):
                labels[j] = input_ids[j]  # the end-of-turn token is learned: it is how the model stops
            i = j + 1
        return labels

    def encode(self, conv: list[dict]) -> dict:
        enc = self.processor.apply_chat_template(self._with_pixels(conv), tokenize=True, return_dict=True,
                                                 return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if self.max_length is not None and len(ids) > self.max_length:
            # Cutting would leave image tokens without their pixels (or an unfinished reply): refuse instead.
            raise ValueError(f"a conversation has {len(ids)} tokens, more than max_length={self.max_length}; "
                             f"raise max_length, lower image_size, or use dialogue='calls'")
        enc = dict(enc)
        enc["labels"] = self.assistant_labels(ids)
        return enc

    def __call__(self, conversations: Sequence[list[dict]]) -> dict:
        return self.collate([self.encode(c) for c in conversations])

    def collate(self, encs: Sequence[dict]) -> dict:
        """Right-padded batch of :meth:`encode` results."""
        import torch

        width = max(len(e["labels"]) for e in encs)
        batch: dict[str, Any] = {}

        def pad(key: str, value) -> "torch.Tensor":
            rows = []
            for e in encs:
                row = e[key][0].tolist() if key != "labels" else e["labels"]
                rows.append(row + [value] * (width - len(row)))
            return torch.tensor(rows, dtype=torch.long)  # (B, T)

        batch["input_ids"] = pad("input_ids", self.pad_id)
        batch["attention_mask"] = pad("attention_mask", 0)
        batch["labels"] = pad("labels", IGNORE_INDEX)
        if "mm_token_type_ids" in encs[0]:
            batch["mm_token_type_ids"] = pad("mm_token_type_ids", 0)
        with_images = [e for e in encs if "pixel_values" in e]
        if with_images:
            batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])  # (sum patches, C·T·P·P)
            batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])  # (images, 3)
        return batch


# ---------------------------------------------------------------- shared prefix


def shared_prefix_length(batch: dict, vision_ids: Sequence[int] = (), min_tokens: int = 8) -> int:
    """Leading tokens that every row of a collated batch shares and that can be run once: before the first
    position any row's loss reads (the logit one before the first label), before any vision token, and at
    least ``min_tokens`` long; 0 when there is nothing worth sharing (one row, or rows that differ early)."""
    import torch

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    rows, width = ids.shape
    if rows < 2:
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(0)  # (T,)
    n = int(same.long().cumprod(0).sum())
    cuts = [width - 1, n]
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled):
        cuts.append(int(labelled[0]) - 1)
    vision = torch.isin(ids, torch.tensor(list(vision_ids), dtype=ids.dtype)).any(0)
    if "mm_token_type_ids" in batch:
        vision |= (batch["mm_token_type_ids"] != 0).any(0)
    if vision.any():
        cuts.append(int(vision.nonzero()[0]))
    n = min(cuts)
    return n if n >= min_tokens else 0


def system_key(conversation: list[dict]) -> str:
    """What groups conversations for a shared prefix: the system turn's text ('' without one)."""
    first = conversation[0] if conversation else {}
    content = first.get("content", "") if first.get("role") == "system" else ""
    return content if isinstance(content, str) else json.dumps(content, default=str)


# ---------------------------------------------------------------- config and trainer


class SFTVLMTrainer:
    """``SFTVLMTrainer(model, processor, config, dataset).train()`` -> list of logged metrics per step."""

    def __init__(self, model, processor, config: SFTVLMConfig, dataset: TrajectoryDialogueDataset):
        import torch
        from transformers import get_scheduler

        self.cfg, self.processor, self.dataset = config, processor, dataset
        # A batch without canvases leaves a trained vision tower without gradient.
        self.accelerator = ck.make_accelerator(config.mixed_precision, find_unused_parameters=config.train_vision)
        model.config.use_cache = False
        if config.lora_rank:
            from peft import LoraConfig, get_peft_model

            with torch.random.fork_rng(devices=[]):  # the adapter's init depends on the seed alone
                torch.manual_seed(config.seed)
                model = get_peft_model(model, LoraConfig(
                    r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    target_modules=config.lora_target_modules, init_lora_weights=True))
        else:
            model.requires_grad_(True)
            if not config.train_vision:
                model.model.visual.requires_grad_(False)
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: lora_target_modules matched no module")
        self.collator = AssistantOnlyCollator(processor, image_size=config.image_size, max_length=config.max_length)
        opt = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        sched = get_scheduler(config.lr_scheduler, opt, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps)
        self.run, self.optimizer = self.accelerator.prepare(model, opt)
        self.lr_scheduler = sched  # not prepared: see checkpointing.step_schedule
        self.params = [p for p in self.run.parameters() if p.requires_grad]
        self.checkpointer = ck.Checkpointer(self.accelerator, config.output_dir, modules={"model": self.run}, schedule=sched,
                                            keep=config.keep_checkpoints,
                                            fingerprint={"learning_rate": config.learning_rate, "lora_rank": config.lora_rank})
        self.step = 0
        self.history: list[dict] = []
        # One process only: two forwards per micro-batch do not go through DDP's reducer.
        self.share_prefix = config.share_prefix and self.accelerator.num_processes == 1
        core = self.accelerator.unwrap_model(self.run)
        self._rope = next((m for m in core.modules() if hasattr(m, "get_rope_index")), None)
        cfg_ids = core.config
        self._vision_ids = [i for i in (getattr(cfg_ids, k, None) for k in
                                        ("image_token_id", "video_token_id", "vision_start_token_id")) if i is not None]
        if self._rope is None:
            self.share_prefix = False
        self._encoded: dict[int, tuple[str, dict]] = {}  # dataset index -> (system key, encoding)
        self._encoded_bytes = 0
        import inspect

        base = core.get_base_model() if hasattr(core, "get_base_model") else core  # under a LoRA wrapper
        params = inspect.signature(type(base).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def batch_indices(self, step: int) -> list[int]:
        """Conversations of optimizer step ``step`` on this process: a function of the step, so resume is exact."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        per_step = self.cfg.batch_size * world
        out = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, pos = divmod(k, len(self.dataset))
            perm = list(range(len(self.dataset)))
            random.Random(derive_seed(self.cfg.seed, epoch)).shuffle(perm)
            out.append(perm[pos])
        return out[rank::world]

    def loss(self, batch: dict, share_prefix: Optional[bool] = None) -> tuple["torch.Tensor", int]:
        """Mean cross-entropy over this micro-batch's assistant tokens, and how many there were.

        With a shared prefix (``share_prefix``, default the trainer's setting) the rows' common leading tokens
        run once; the loss is the same (see :func:`shared_prefix_length`)."""
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        n_labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        share = self.share_prefix if share_prefix is None else share_prefix
        prefix = shared_prefix_length(batch, self._vision_ids) if share else 0
        with self.accelerator.autocast():
            if prefix:
                return self._prefix_loss(batch, prefix), n_labels
            out = self.run(**batch)
        return out.loss, n_labels

    def _positions(self, batch: dict) -> "torch.Tensor":
        """The position ids the model computes itself for ``batch``: M-RoPE (3, B, T) with images, text (B, T) without."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if "image_grid_thw" in batch and "mm_token_type_ids" in batch:
            return self._rope.get_rope_index(ids, image_grid_thw=batch["image_grid_thw"], attention_mask=mask,
                                             mm_token_type_ids=batch["mm_token_type_ids"])[0]
        import torch

        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)

    def _prefix_loss(self, batch: dict, prefix: int) -> "torch.Tensor":
        """The plain forward's loss, with the first ``prefix`` tokens (the same in every row) run once."""
        import torch.nn.functional as F

        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        rows = ids.shape[0]
        pos = self._positions(batch)
        head = pos[..., :1, :prefix]
        pre = self.run(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix], position_ids=head,
                       use_cache=True, logits_to_keep=1)
        cache = getattr(pre, self._cache_kw)
        for layer in cache.layers:  # every row attends to the one prefix (gradients sum over the rows)
            layer.keys = layer.keys.expand(rows, -1, -1, -1)
            layer.values = layer.values.expand(rows, -1, -1, -1)
        rest = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
        if "mm_token_type_ids" in batch:
            rest["mm_token_type_ids"] = batch["mm_token_type_ids"][:, prefix:]
        out = self.run(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=pos[..., prefix:],
                       use_cache=True, **{self._cache_kw: cache}, **rest)
        logits = out.logits[:, :-1].float()
        target = labels[:, prefix + 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)

    def encoded(self, i: int) -> tuple[str, dict]:
        """Conversation ``i`` rendered and tokenized, with its system key; kept in memory (within
        ``encode_cache_mb``) for the next epoch, since neither the data nor the processor change in a run."""
        hit = self._encoded.get(i)
        if hit is not None:
            return hit
        conv = self.dataset[i]
        enc = self.collator.encode(conv)
        item = (system_key(conv), enc)
        size = sum(v.numel() * v.element_size() for v in enc.values() if hasattr(v, "numel")) + 8 * len(enc["labels"])
        if self._encoded_bytes + size <= self.cfg.encode_cache_mb * 2**20:
            self._encoded[i] = item
            self._encoded_bytes += size
        return item

    def micro_batches(self, indices: Sequence[int]) -> list[dict]:
        """One optimizer step's conversations as collated micro-batches of at most batch_size /
        gradient_accumulation_steps rows; with a shared prefix, each micro-batch holds one system text."""
        micro = self.cfg.batch_size // self.cfg.gradient_accumulation_steps
        groups: dict[str, list] = {}
        for i in indices:
            key, enc = self.encoded(i)
            groups.setdefault(key if self.share_prefix else "", []).append(enc)
        return [self.collator.collate(g[s:s + micro]) for g in groups.values() for s in range(0, len(g), micro)]

    def evaluate(self, indices: Sequence[int]) -> float:
        """Token-weighted assistant loss on the given conversations (no gradient)."""
        import torch

        self.run.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i in indices:
                loss, n = self.loss(self.collator([self.dataset[i]]))
                total, tokens = total + loss.item() * n, tokens + n
        self.run.train()
        return total / max(tokens, 1)

    def train(self) -> list[dict]:
        cfg, acc = self.cfg, self.accelerator
        out = Path(cfg.output_dir)
        ckpt = ck.latest_checkpoint(out) if cfg.resume else None
        if cfg.resume and ckpt is None:
            raise ValueError(f"--resume: no checkpoint under {out / 'checkpoints'}; drop --resume to start fresh")
        if ckpt is not None:
            self.step = self.checkpointer.load(ckpt)
        self.run.train()
        bar = tqdm(range(self.step, cfg.max_steps), initial=self.step, total=cfg.max_steps, desc="sft-vlm",
                   disable=not acc.is_local_main_process)
        for step in bar:
            batches = self.micro_batches(self.batch_indices(step))
            n_total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            if n_total == 0:
                raise ValueError(f"step {step}: the batch has no assistant tokens; check the dataset")
            step_loss = 0.0
            for k, b in enumerate(batches):
                # gradients are all-reduced once, after the last micro-batch
                with acc.no_sync(self.run) if k + 1 < len(batches) else contextlib.nullcontext():
                    loss, n = self.loss(b)
                    loss = loss * (n / n_total)  # token-weighted mean over the whole optimizer step
                    if not math.isfinite(loss.item()):
                        raise FloatingPointError(f"non-finite loss at step {step}: lower learning_rate or resume from the last checkpoint")
                    acc.backward(loss)
                step_loss += loss.item()
            lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step is taken with
            grad_norm = acc.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            self.optimizer.step()
            ck.step_schedule(self.optimizer, self.lr_scheduler)
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step + 1
            rec = {"step": self.step, "loss": step_loss, "tokens": n_total, "lr": lr}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            self.history.append(rec)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if acc.is_main_process and cfg.log_every and self.step % cfg.log_every == 0:
                append_log(out, rec)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        if acc.is_main_process:
            self.export(out)
        acc.wait_for_everyone()
        return self.history

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """``checkpoints/step-N/`` through ``accelerator.save_state`` (see :mod:`~clvr_agent.training.checkpointing`)."""
        self.checkpointer.save(self.step)

    def export(self, out: Path) -> Path:
        """Save a plain Qwen3-VL folder (safetensors, LoRA merged in place) plus the processor."""
        model = self.accelerator.unwrap_model(self.run)
        if self.cfg.lora_rank:
            model = model.merge_and_unload()  # the trainer's model is plain afterwards; training is over
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        self.processor.save_pretrained(out)
        (out / "training_args.json").write_text(json.dumps({"stage": "sft-vlm", **asdict(self.cfg)}, indent=2))
        return out


latest_checkpoint = ck.latest_checkpoint

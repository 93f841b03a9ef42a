"""Δ-space weight merge (DSWM): W = W_base + λa·(W_aligned − W_base) + λd·(W_distilled − W_base).

Streams row chunks of one tensor at a time from memory-mapped safetensors (each a fresh fp32 copy, so
the in-place arithmetic below never writes into a mapping), computes in fp32, casts back to the base dtype
and writes sharded safetensors plus an index, so peak anonymous memory is a few chunks whatever the
checkpoint size and dtype (`clvr bench merge`). The aligned or distilled input may also be a peft LoRA adapter, densified
per module as ΔW = scaling · B @ A. A JSON report carries per-tensor diagnostics.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from tqdm import tqdm

from .merge_io import Checkpoint, LoraDelta, ShardedWriter, TensorInfo, open_input, row_chunks
from clvr_agent.seeds import derive_seed

Method = Literal["sum", "ties", "dare"]
REPORT_NAME = "merge_report.json"


@dataclass
class MergeConfig:
    """Inputs, coefficients and method of one DSWM merge."""

    base: Path = field(metadata={"help": "base checkpoint: .safetensors file, sharded folder or diffusers folder"})
    aligned: Path = field(metadata={"help": "aligned checkpoint (same layout as base) or peft LoRA adapter folder"})
    distilled: Path = field(metadata={"help": "distilled checkpoint (same layout as base) or peft LoRA adapter folder"})
    out: Path = field(metadata={"help": "output folder (created; must be new or empty)"})
    lambda_align: float = field(default=1.0, metadata={"help": "λa, scale of W_aligned − W_base"})
    lambda_distill: float = field(default=1.0, metadata={"help": "λd, scale of W_distilled − W_base"})
    method: Method = field(default="sum", metadata={"help": "sum (task arithmetic) | ties | dare"})
    ties_density: float = field(default=0.2, metadata={"help": "ties: fraction of each delta kept, by |value| per tensor"})
    dare_drop: float = field(default=0.5, metadata={"help": "dare: probability of dropping a delta entry (survivors / (1-p))"})
    seed: int = field(default=0, metadata={"help": "dare: seed of the drop masks"})
    max_shard_mb: float = field(default=2048.0, metadata={"help": "largest output shard, in MB (10^6 bytes)"})

    def __post_init__(self) -> None:
        self.base, self.aligned, self.distilled, self.out = map(Path, (self.base, self.aligned, self.distilled, self.out))
        for role in ("base", "aligned", "distilled"):
            if not getattr(self, role).exists():
                raise ValueError(f"--{role} {getattr(self, role)} does not exist; pass a .safetensors file or model folder")
        if (self.base / "adapter_config.json").exists():
            raise ValueError("--base is a LoRA adapter; the base must be a full checkpoint (adapters go in --aligned/--distilled)")
        if self.method not in ("sum", "ties", "dare"):
            raise ValueError(f"--method {self.method!r} is unknown; use sum, ties or dare")
        for name in ("lambda_align", "lambda_distill"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number")
        if not 0.0 < self.ties_density <= 1.0:
            raise ValueError(f"--ties-density {self.ties_density} must be in (0, 1]; 0.2 keeps the top 20% of each delta")
        if not 0.0 <= self.dare_drop < 1.0:
            raise ValueError(f"--dare-drop {self.dare_drop} must be in [0, 1); survivors are rescaled by 1/(1-p)")
        if self.max_shard_mb <= 0:
            raise ValueError(f"--max-shard-mb {self.max_shard_mb} must be positive")
        inputs = {p.resolve() for p in (self.base, self.aligned, self.distilled)}
        out = self.out.resolve()
        if any(out == p or out in p.parents for p in inputs):
            raise ValueError(f"--out {self.out} would overwrite an input; choose a new folder")
        if self.out.exists() and any(self.out.iterdir()):
            raise ValueError(f"--out {self.out} is not empty; choose a new folder or delete it")


def merge_checkpoints(config: MergeConfig) -> dict:
    """Run the merge, write shards + index (+ config.json of a model folder) and the report; return the report."""
    t0 = time.perf_counter()
    base = Checkpoint(config.base)
    deltas = [open_input(config.aligned), open_input(config.distilled)]
    for d in deltas:
        _check_compatible(base, d)
    infos = {name: base.infos[name] for name in sorted(base.infos)}
    config.out.mkdir(parents=True, exist_ok=True)
    writer = ShardedWriter(config.out, infos, int(config.max_shard_mb * 1e6), base.weights_prefix)
    lambdas = (config.lambda_align, config.lambda_distill)
    tensors = {
        name: _merge_tensor(name, info, base, deltas, lambdas, config, writer)
        for name, info in tqdm(infos.items(), desc="merge", unit="tensor", disable=None)
    }
    index = writer.close()
    copied = None
    if base.folder is not None and (base.folder / "config.json").is_file():
        copied = str(shutil.copy(base.folder / "config.json", config.out / "config.json"))
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "outputs": {"index": str(index), "shards": [f for f, _ in writer.shards], "config_json": copied},
        "summary": _summarize(tensors, infos, time.perf_counter() - t0),
        "tensors": tensors,
    }
    (config.out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def _check_compatible(base: Checkpoint, d: Checkpoint | LoraDelta) -> None:
    for name, info in base.infos.items():
        if not info.dtype.is_floating_point:
            raise ValueError(f"base tensor {name!r} is {info.dtype}; only floating-point checkpoints can be merged")
    if isinstance(d, LoraDelta):
        d.check_against(base)
        return
    missing, extra = sorted(set(base.infos) - set(d.infos)), sorted(set(d.infos) - set(base.infos))
    if missing or extra:
        raise ValueError(
            f"{d.path} does not match the base's tensor names: missing {missing[:5]} extra {extra[:5]} "
            f"({len(missing)} missing, {len(extra)} extra); inputs must share one parameter layout"
        )
    for name, info in base.infos.items():
        other = d.infos[name]
        if other.shape != info.shape:
            raise ValueError(f"{d.path}: tensor {name!r} has shape {other.shape}, base has {info.shape}")
        if not other.dtype.is_floating_point:
            raise ValueError(f"{d.path}: tensor {name!r} is {other.dtype}; only floating-point tensors can be merged")


def _delta_chunk(d: Checkpoint | LoraDelta, name: str, rows: tuple[int, int], b: torch.Tensor) -> torch.Tensor:
    """τ rows for one input: W_input − W_base for checkpoints, the densified ΔW (or zeros) for LoRA."""
    if isinstance(d, LoraDelta):
        tau = d.delta_chunk(name, rows)
        return torch.zeros_like(b) if tau is None else tau.reshape(b.shape)
    return d.chunk(name, rows).sub_(b)


def _merge_tensor(name, info: TensorInfo, base, deltas, lambdas, cfg: MergeConfig, writer: ShardedWriter) -> dict:
    chunks = row_chunks(info.shape)
    if cfg.method == "ties":  # per-tensor magnitude threshold of each delta, found without a full-size copy
        k = int(cfg.ties_density * info.numel)
        thresholds = [
            _kth_largest_abs(lambda d=d: (_delta_chunk(d, name, r, base.chunk(name, r)) for r in chunks), k)
            for d in deltas
        ]
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, zlib.crc32(name.encode())))
    s = dict.fromkeys(("bb", "aa", "dd", "ad", "both", "conflict", "mm", "cast"), 0.0)
    writer.begin(name)
    for rows in chunks:
        b = base.chunk(name, rows)
        taus = [_delta_chunk(d, name, rows, b) for d in deltas]
        ta, td = taus
        s["bb"] += _dot(b, b)
        s["aa"] += _dot(ta, ta)
        s["dd"] += _dot(td, td)
        s["ad"] += _dot(ta, td)
        if cfg.method == "ties":
            taus = [t.masked_fill_(t.abs() < thr, 0.0) for t, thr in zip(taus, thresholds)]
        elif cfg.method == "dare" and cfg.dare_drop > 0:
            taus = [t.mul_(torch.rand(t.shape, generator=gen) >= cfg.dare_drop).div_(1.0 - cfg.dare_drop) for t in taus]
        wa, wd = (t.mul_(lam) for t, lam in zip(taus, lambdas))  # λ_i τ_i, in place
        agree = torch.sign(wa).mul_(torch.sign(wd))  # +1 same sign, -1 conflict, 0 where either is 0
        both = int(torch.count_nonzero(agree))
        s["both"] += both
        s["conflict"] += (both - int(agree.sum())) // 2
        del agree
        delta = _ties_disjoint_mean(wa, wd) if cfg.method == "ties" else wa.add_(wd)
        mm = _dot(delta, delta)
        w = b.add_(delta)
        out = w.to(info.dtype)
        err = out.float() - w  # out may alias w when the storage dtype is fp32
        cast = _dot(err, err)
        if not math.isfinite(s["bb"] + mm + cast):  # non-finite input, or overflow of the storage dtype
            raise ValueError(f"merged tensor {name!r} has non-finite values; check the inputs and lambdas")
        s["mm"] += mm
        s["cast"] += cast
        writer.write(out)
    return _tensor_stats(info, s)


def _ties_disjoint_mean(wa: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    """TIES elect + disjoint mean of trimmed, λ-weighted deltas: γ = sign(wa + wd); average the entries
    whose sign agrees with γ. Where both agree the two effects are averaged (halved), as in TIES."""
    gamma = torch.sign(wa + wd)
    ma = (torch.sign(wa) == gamma) & (wa != 0)
    md = (torch.sign(wd) == gamma) & (wd != 0)
    count = (ma.to(torch.float32) + md.to(torch.float32)).clamp_(min=1.0)
    return (wa * ma + wd * md).div_(count)


def _kth_largest_abs(chunks: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """Exact k-th largest |x| of a tensor seen chunk by chunk, by a two-pass radix select on the fp32
    bit patterns (non-negative floats order like their int32 bits), so no full-size copy is held."""
    if k <= 0:
        return math.inf
    hist_hi = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        hist_hi += torch.bincount((x.abs().view(torch.int32) >> 16).reshape(-1), minlength=1 << 16)
    at_least = hist_hi.flip(0).cumsum(0)  # at_least[j] = #entries whose high 16 bits >= 65535 - j
    j = int(torch.searchsorted(at_least, k))
    if j >= 1 << 16:  # k exceeds the entry count: keep everything
        return 0.0
    hi = 65535 - j
    k_in = k - (int(at_least[j]) - int(hist_hi[hi]))  # rank of the target inside bucket `hi`
    hist_lo = torch.zeros(1 << 16, dtype=torch.int64)
    for x in chunks():
        bits = x.abs().view(torch.int32)
        hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = 65535 - int(torch.searchsorted(hist_lo.flip(0).cumsum(0), k_in))
    return torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), y.reshape(-1)))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _tensor_stats(info: TensorInfo, s: dict) -> dict:
    return {
        "shape": list(info.shape),
        "dtype": str(info.dtype).removeprefix("torch."),
        "norm_base": math.sqrt(s["bb"]),
        "norm_delta_align": math.sqrt(s["aa"]),
        "norm_delta_distill": math.sqrt(s["dd"]),
        "rel_delta_align": _ratio(math.sqrt(s["aa"]), math.sqrt(s["bb"])),
        "rel_delta_distill": _ratio(math.sqrt(s["dd"]), math.sqrt(s["bb"])),
        "cosine": _ratio(s["ad"], math.sqrt(s["aa"] * s["dd"])),
        # among entries where both (trimmed/dropped, λ-weighted) deltas are nonzero: share of opposite signs
        "sign_conflict": _ratio(s["conflict"], s["both"]),
        "norm_merged_delta": math.sqrt(s["mm"]),
        # ‖cast(W) − W‖ / ‖ΔW‖: how much of the delta the storage dtype rounds away
        "cast_rel_error": _ratio(math.sqrt(s["cast"]), math.sqrt(s["mm"])),
    }


def _summarize(tensors: dict, infos: dict[str, TensorInfo], seconds: float) -> dict:
    def tot(key: str) -> float:
        return math.sqrt(sum(t[key] ** 2 for t in tensors.values()))

    conflicts = [t["sign_conflict"] for t in tensors.values() if t["sign_conflict"] is not None]
    casts = [t["cast_rel_error"] for t in tensors.values() if t["cast_rel_error"] is not None]
    cosines = [t["cosine"] for t in tensors.values() if t["cosine"] is not None]
    return {
        "n_tensors": len(tensors),
        "total_bytes": sum(i.nbytes for i in infos.values()),
        "largest_tensor_bytes": max((i.nbytes for i in infos.values()), default=0),
        "seconds": seconds,
        "norm_delta_align": tot("norm_delta_align"),
        "norm_delta_distill": tot("norm_delta_distill"),
        "norm_merged_delta": tot("norm_merged_delta"),
        "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
        "mean_sign_conflict": sum(conflicts) / len(conflicts) if conflicts else None,
        "max_cast_rel_error": max(casts, default=None),
    }

"""Streaming safetensors I/O for the Δ-space weight merge (DSWM).

Readers hand out fp32 row chunks of one tensor at a time from memory-mapped files, so a merge never
holds more than a few chunks in anonymous memory; the writer precomputes each shard's header (names,
dtypes and shapes are known from the base) and appends tensor bytes in header order.

Every chunk is a *copy* into a fresh fp32 buffer. safetensors' slices are views of a private
(copy-on-write) file mapping, and for an fp32 file ``.float()`` returns that view itself: an in-place op
on it would write into the mapping, turning each touched page into anonymous memory that the cached
file handle keeps alive until the merge ends (three 320 MB fp32 inputs peaked at ~1 GB). Read-only,
mapped pages stay page cache (RssFile), which the kernel reclaims under pressure.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# Rows per chunk are chosen so one fp32 chunk holds about this many elements (8 MB); a merge keeps
# roughly ten such buffers alive, which bounds its working set independently of the tensor size.
CHUNK_ELEMS = 1 << 21

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_LORA_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def fp32_copy(mapped: torch.Tensor) -> torch.Tensor:
    """``mapped`` (a view of a memory-mapped file) copied into a new fp32 tensor; never an alias."""
    out = torch.empty(mapped.shape, dtype=torch.float32)
    out.copy_(mapped)
    return out


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """Row ranges along dim 0 that cover the tensor in chunks of about CHUNK_ELEMS elements."""
    if len(shape) == 0:
        return [(0, 1)]
    rows, row_elems = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMS // max(row_elems, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, 0)]


class Checkpoint:
    """A full checkpoint: one `.safetensors` file, a sharded folder with its index, or a diffusers folder."""

    def __init__(self, path: Path):
        self.path = path
        self.weight_map = _weight_map(path)  # tensor name -> file
        self.folder = path if path.is_dir() else None
        self._handles: dict[Path, object] = {}
        self.infos: dict[str, TensorInfo] = {}
        for file in sorted(set(self.weight_map.values())):
            f = self._open(file)
            for name in f.keys():
                if self.weight_map.get(name) == file:
                    sl = f.get_slice(name)
                    self.infos[name] = TensorInfo(tuple(sl.get_shape()), _DTYPE_OF[sl.get_dtype()])
        missing = sorted(set(self.weight_map) - set(self.infos))
        if missing:
            raise ValueError(f"{path}: the index lists tensors its shards do not hold, e.g. {missing[:5]}")

    def _open(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")  # memory mapped
        return self._handles[file]

    @property
    def weights_prefix(self) -> str:
        """File-name stem for output shards: diffusers loads `diffusion_pytorch_model*`, others `model*`."""
        stems = {f.name for f in set(self.weight_map.values())}
        return "diffusion_pytorch_model" if any(s.startswith("diffusion_pytorch_model") for s in stems) else "model"

    def chunk(self, name: str, rows: tuple[int, int]) -> torch.Tensor:
        """Rows [a, b) of tensor `name` in a fresh fp32 buffer the caller may modify in place."""
        f = self._open(self.weight_map[name])
        if len(self.infos[name].shape) == 0:
            return fp32_copy(f.get_tensor(name).reshape(1))
        return fp32_copy(f.get_slice(name)[rows[0]:rows[1]])


class LoraDelta:
    """A peft LoRA adapter read as dense per-module deltas ΔW = scaling · B @ A, built chunk by chunk."""

    def __init__(self, path: Path):
        cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
        if not weights.is_file():
            raise ValueError(f"{path}: a LoRA adapter folder needs adapter_model.safetensors next to adapter_config.json")
        cfg = json.loads(cfg_file.read_text())
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias")):
            if cfg.get(flag):
                raise ValueError(f"{path}: {what} adapters are not supported; merge it with peft first")
        self.path, self.cfg = path, cfg
        self._f = safe_open(str(weights), framework="pt")
        factors: dict[str, dict[str, TensorInfo]] = {}
        for key in self._f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                raise ValueError(
                    f"{path}: unsupported adapter tensor {key!r}; only peft LoRA factors "
                    "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' can be densified"
                )
            sl = self._f.get_slice(key)
            factors.setdefault(m.group(1), {})[m.group(2)] = TensorInfo(tuple(sl.get_shape()), _DTYPE_OF[sl.get_dtype()])
        self.modules: dict[str, tuple[int, float]] = {}  # base weight name -> (rank, scaling)
        self._shape: dict[str, tuple[int, int]] = {}  # base weight name -> dense ΔW shape
        for module, ab in factors.items():
            if set(ab) != {"A", "B"} or len(ab["A"].shape) != 2 or len(ab["B"].shape) != 2:
                raise ValueError(f"{path}: module {module!r} needs 2-D lora_A and lora_B (linear LoRA only)")
            r = ab["A"].shape[0]
            if ab["B"].shape[1] != r:
                raise ValueError(f"{path}: {module!r} has lora_A rank {r} but lora_B {ab['B'].shape}")
            alpha = cfg.get("lora_alpha", 8)
            for pattern, a in (cfg.get("alpha_pattern") or {}).items():
                if re.match(rf"(.*\.)?({pattern})$", module):  # peft's get_pattern_key rule
                    alpha = a
                    break
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            out_f, in_f = ab["B"].shape[0], ab["A"].shape[1]
            shape = (in_f, out_f) if cfg.get("fan_in_fan_out") else (out_f, in_f)
            self.modules[f"{module}.weight"] = (r, scaling)
            self._shape[f"{module}.weight"] = shape

    def check_against(self, base: Checkpoint) -> None:
        for name, shape in self._shape.items():
            if name not in base.infos:
                raise ValueError(f"{self.path}: LoRA targets {name!r}, which the base checkpoint does not have")
            if base.infos[name].shape != shape:
                raise ValueError(f"{self.path}: LoRA delta for {name!r} has shape {shape}, base has {base.infos[name].shape}")

    def delta_chunk(self, name: str, rows: tuple[int, int]) -> torch.Tensor | None:
        """Rows [a, b) of ΔW for base tensor `name`, or None where the adapter does not touch it."""
        if name not in self.modules:
            return None
        module = name[: -len(".weight")]
        _, scaling = self.modules[name]
        a = fp32_copy(self._f.get_tensor(f"base_model.model.{module}.lora_A.weight"))  # (r, in)
        if self.cfg.get("fan_in_fan_out"):  # ΔW stored as (in, out): rows index A's columns
            b = fp32_copy(self._f.get_tensor(f"base_model.model.{module}.lora_B.weight"))  # (out, r)
            return (b @ a[:, rows[0]:rows[1]]).T.mul_(scaling)  # a fresh (rows, out) buffer
        b = fp32_copy(self._f.get_slice(f"base_model.model.{module}.lora_B.weight")[rows[0]:rows[1]])
        return (b @ a).mul_(scaling)  # (rows, r) @ (r, in) -> (rows, in)


def open_input(path: Path) -> Checkpoint | LoraDelta:
    """Open a merge input: LoRA adapter folders become LoraDelta, everything else a Checkpoint."""
    if not path.exists():
        raise FileNotFoundError(f"merge input {path} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return LoraDelta(path)
    return Checkpoint(path)


def _weight_map(path: Path) -> dict[str, Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: expected a .safetensors file, a sharded folder or a diffusers model folder")
        with safe_open(str(path), framework="pt") as f:
            return {k: path for k in f.keys()}
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"{path}: several index files {[i.name for i in indexes]}; keep one")
    if indexes:
        wm = json.loads(indexes[0].read_text())["weight_map"]
        return {k: path / v for k, v in wm.items()}
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(
            f"{path}: found {len(files)} .safetensors files and no *.safetensors.index.json; "
            "pass a single file, a sharded folder with its index, or a diffusers model folder"
        )
    return _weight_map(files[0])


class ShardedWriter:
    """Writes tensors in a fixed order into shards whose headers are computed up front.

    Each shard is `<prefix>-0000i-of-0000n.safetensors`; the index is `<prefix>.safetensors.index.json`
    (diffusers reads `diffusion_pytorch_model.safetensors.index.json`, transformers `model.safetensors.index.json`).
    """

    def __init__(self, out: Path, infos: dict[str, TensorInfo], max_shard_bytes: int, prefix: str):
        self.out, self.infos, self.prefix = out, infos, prefix
        shards: list[list[str]] = [[]]
        size = 0
        for name in infos:  # greedy fill in the given order
            nb = infos[name].nbytes
            if shards[-1] and size + nb > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nb
        n = len(shards)
        self.shards = [(f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors", names) for i, names in enumerate(shards)]
        self._plan = iter(self.shards)
        self._file = None
        self._pending: list[str] = []
        self._left = 0

    def begin(self, name: str) -> None:
        """Start writing tensor `name`; must follow the planned order."""
        if self._left:
            raise RuntimeError(f"tensor before {name!r} was not fully written")
        if not self._pending:
            self._next_shard()
        expected = self._pending.pop(0)
        if expected != name:
            raise RuntimeError(f"writer expected {expected!r}, got {name!r}")
        self._left = self.infos[name].nbytes

    def write(self, chunk: torch.Tensor) -> None:
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._left -= data.nbytes
        if self._left < 0:
            raise RuntimeError("wrote more bytes than the tensor holds")
        self._file.write(data)

    def _next_shard(self) -> None:
        if self._file:
            self._file.close()
        fname, names = next(self._plan)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            info = self.infos[name]
            header[name] = {"dtype": _DTYPES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header with spaces to 8-byte alignment
        self._file = open(self.out / fname, "wb")
        self._file.write(struct.pack("<Q", len(blob)) + blob)
        self._pending = list(names)

    def close(self) -> Path:
        if self._left or self._pending or next(self._plan, None) is not None:
            raise RuntimeError("writer closed before every planned tensor was written")
        if self._file:
            self._file.close()
        index = {
            "metadata": {"total_size": sum(i.nbytes for i in self.infos.values())},
            "weight_map": {name: fname for fname, names in self.shards for name in names},
        }
        path = self.out / f"{self.prefix}.safetensors.index.json"
        path.write_text(json.dumps(index, indent=2))
        return path


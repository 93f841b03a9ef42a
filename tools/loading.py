"""Where weights come from and in what dtype: the shipped toy checkpoints, a local folder or a hub id.

Every loader (klein, Qwen3-VL, Mask2Former, CLIP) and the CLI's argument checks use these, so a
path-like name that does not exist is one clear error everywhere, never a download attempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

SHIPPED_MODELS = Path(__file__).with_name("models")


def shipped_model(name: str) -> Path:
    """The folder of a checkpoint shipped in the package (``tools/models/<name>``)."""
    path = SHIPPED_MODELS / name
    if not path.is_dir():
        raise FileNotFoundError(f"{name} is not installed at {path}; reinstall clvr-agent or pass a folder")
    return path


def model_source(value: str, what: str = "model") -> Optional[Path]:
    """The folder ``value`` names, or None for a hub id (``owner/name``).

    A file, or a path-like name (``./x``, ``/x``, ``~/x``, no single slash) that does not exist,
    raises FileNotFoundError naming ``what``."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what} {value} is a file; expected a checkpoint folder")
        return path
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") != 1:
        raise FileNotFoundError(f"{what} {value}: does not exist (and is not a hub id 'owner/name')")
    return None


def parse_dtype(value: Any, *, allow_auto: bool = False):
    """``"bfloat16"`` (or a torch.dtype) -> torch.dtype; ``"auto"`` passes through when the loader takes it."""
    import torch

    if isinstance(value, torch.dtype) or (allow_auto and value == "auto"):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {value!r}; use bfloat16, float16 or float32"
                         + (" or auto" if allow_auto else ""))
    return dtype


def default_device(device: Optional[str]) -> str:
    """The device a loader uses when the caller names none: cuda when one is there, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")

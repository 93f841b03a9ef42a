"""The run's artifact store: content-addressed PNG files, written atomically.

State only ever holds the :class:`~clvr_agent.types.ImageRef` this returns, so checkpoints stay
small and an interrupted run never leaves a half-written image behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from clvr_agent.types import ImageRef


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _umask_mode()


class ArtifactStore:
    """PNG files under ``root``. With ``base`` (a run folder), the refs it returns hold paths
    relative to ``base`` (``steps/<sha256>.png``), so the folder can be moved or copied whole."""

    def __init__(self, root: str | os.PathLike, base: str | os.PathLike | None = None):
        self.root = Path(root)
        self.base = Path(base).resolve() if base is not None else None

    def put(self, image: Image.Image) -> ImageRef:
        """Encode ``image`` as PNG and store it under its sha256; idempotent for equal pixels."""
        buf = io.BytesIO()
        # compress_level=1: PNG stays lossless; level 6 costs ~5x the time for ~10% smaller files.
        image.convert("RGB").save(buf, format="PNG", compress_level=1)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / f"{digest}.png"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".png")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; a canvas is a shared output like any file
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        full = path.resolve()
        return ImageRef(
            path=os.path.relpath(full, self.base) if self.base is not None else str(full),
            sha256=digest,
            width=image.width,
            height=image.height,
            size_bytes=len(data),
        )

    def path_of(self, ref: ImageRef) -> Path:
        """The file behind ``ref``, wherever this store's folder now is."""
        return Path(ref.resolved(str(self.base) if self.base is not None else None))


def load_reference_image(path: str | os.PathLike) -> Image.Image:
    """Open a user-supplied image, with a one-line error when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"reference image not found: {p}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise ValueError(f"reference image is not a readable image: {p} ({exc.__class__.__name__})") from None

"""Every file a run writes is written whole or not at all: atomic_write.

A crash, a kill or a full disk mid-write must never leave a half-written checkpoint, log,
plot or cache where the last good one was. So the bytes go to a temporary file beside the
target, are flushed to disk, and only then renamed over it: a rename within one folder is
atomic, so a reader sees the old file or the new one, never a mix, and at worst a stray
temporary file is left (RunFiles.prepare removes a checkpoint's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`text` as UTF-8, atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))

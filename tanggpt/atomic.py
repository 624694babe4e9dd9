"""Every file a run writes is written whole or not at all: atomic_write.

A crash, a kill or a full disk mid-write must never leave a half-written checkpoint, log,
plot or cache where the last good one was. So the bytes go to a temporary file beside the
target, are flushed to disk, and only then renamed over it: a rename within one folder is
atomic, so a reader sees the old file or the new one, never a mix, and at worst a stray
temporary file is left (RunFiles.prepare removes a checkpoint's).

Text is written as UTF-8 with backslash escapes for what UTF-8 cannot hold (a lone
surrogate): input is checked where it is read, and a file is never lost to one that slipped
through. And a tool checks its output paths before any work (check_output): a file it can
write, and none of the files it reads, so a mistyped flag cannot replace a run's input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from data.errors import UserError


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
    """`text` as UTF-8, atomically (a lone surrogate, which UTF-8 cannot hold, as its \\udXXX escape)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", "backslashreplace")))


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same path once resolved, or (both existing) one
    file under two names, as a hard link or a symlink makes."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output(path: str | Path, flag: str, inputs: dict[str, str | Path] | None = None,
                 example: str = "a file path") -> None:
    """Refuse, in one line naming `flag`, an output path that cannot be written as a file (a
    folder, under a file, in a folder we may not write) or that is one of `inputs` (what
    each is, such as "--ckpt" or "the base checkpoint" -> its path). Called before any work,
    so nothing is computed for an output that cannot be kept, and no input is ever replaced.
    `example` completes "give ..." when the path is a folder."""
    path = Path(path)
    for what, source in (inputs or {}).items():
        if source and same_file(path, source):
            raise UserError(f"{flag} {path} is {what} ({source}), which this run reads; give another {flag}")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give {example}")
    folder = path.parent
    blocking = next((p for p in (*folder.parents[::-1], folder) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UserError(f"{flag} {path}: cannot make the folder {folder}, since {blocking} is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".{path.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None

"""Execute the course notebooks top to bottom and save their outputs in place.

    python -m tools.run_notebooks                      # every notebooks/NN_*.ipynb, default settings
    python -m tools.run_notebooks 02_model.ipynb       # just one (the .ipynb may be left off)
    python -m tools.run_notebooks --fast               # COURSE_FAST=1: tiny runs, under a minute each
    python -m tools.run_notebooks --check --fast       # execute without saving (what the tests do)

Each notebook runs in a fresh `python3` kernel whose working directory is notebooks/,
with COURSE_FAST set to 1 (--fast) or 0 (otherwise) in its environment. The wall time of
each is printed. A failing cell stops the run with one line naming the notebook and
the cell; nothing is saved for a notebook that failed. A saved notebook is stamped with
the settings it ran with and the fingerprint of the code it ran against
(code_fingerprint) and of its own code cells: the tests fail on a notebook whose code, or
the library's, has changed since.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

from data.errors import UserError
from tanggpt.cli import flag, run_cli

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 900  # seconds per cell: generous, the default-mode training cells take a few minutes


# The code a notebook's outputs come from: the commands that train its checkpoints, the
# library and data layer they use, and the notebooks' helper. tools/ and tests/ are not.
CODE_FOLDERS = (".", "data", "tanggpt")
CODE_FILES = ("notebooks/course.py",)


def _code_text(path: Path) -> str:
    """A source file as its syntax tree, without docstrings: a changed comment, docstring or
    layout leaves the fingerprint alone, a changed line of code does not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def code_fingerprint() -> str:
    """sha256 of the code the notebooks' outputs come from (CODE_FOLDERS' .py files and
    CODE_FILES), 16 hex digits. Saved in each executed notebook; the tests compare it with
    today's, so a notebook older than the code its checkpoints are trained with fails CI."""
    repo = NOTEBOOKS.parent
    paths = sorted({*(p for folder in CODE_FOLDERS for p in (repo / folder).glob("*.py")),
                    *(repo / name for name in CODE_FILES)})
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.relative_to(repo).as_posix()}\n{_code_text(path)}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def cells_fingerprint(nb: nbformat.NotebookNode) -> str:
    """sha256 of a notebook's code cells, 16 hex digits: saved with its outputs, so a code cell
    edited after the notebook was executed (its outputs now stale) fails the tests too."""
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    return hashlib.sha256("\n\0".join(sources).encode("utf-8")).hexdigest()[:16]


class NotebookError(Exception):
    """A notebook failed to run; the message is one line naming the notebook and the cell."""


@dataclass
class RunNotebooksConfig:
    names: tuple[str, ...] = flag((), "notebooks to run (default: every notebooks/NN_*.ipynb, in order)",
                                  positional=True)
    fast: bool = flag(False, "run with COURSE_FAST=1 (tiny settings, under a minute each)")
    check: bool = flag(False, "execute without saving the outputs (for CI)")


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The notebooks to run: the named ones (in notebooks/ or as paths), else every NN_*.ipynb in order."""
    if not names:
        return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    paths = []
    for name in names:
        candidates = [Path(name), NOTEBOOKS / name, NOTEBOOKS / f"{name}.ipynb"]
        path = next((p for p in candidates if p.suffix == ".ipynb" and p.is_file()), None)
        if path is None:
            raise UserError(f"{name}: no such notebook in {NOTEBOOKS}")
        paths.append(path.resolve())
    return paths


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _encryption() -> dict:
    """Encrypt the kernel's channels where jupyter_client and pyzmq can (CurveZMQ); newer
    ipykernels warn on stderr about plain TCP otherwise. Older versions run as before."""
    import zmq
    from jupyter_client import KernelManager

    if "transport_encryption" in KernelManager.class_traits() and zmq.has("curve"):
        return {"transport_encryption": "auto"}
    return {}


def execute_notebook(path: str | Path, fast: bool = False, save: bool = True) -> float:
    """Run one notebook in a fresh kernel; return its wall time in seconds.

    With save, the executed notebook (outputs, execution counts) is validated as nbformat
    v4 and written back in place. Raises NotebookError naming the notebook and the cell.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
        record_timing=False,  # no per-cell timestamps: they would change on every run
        # One output per stream and a progress bar's redraws (\r) collapsed to the bar it
        # ended with: a training cell shows one progress line per run, not one per update.
        coalesce_streams=True,
    )
    current = {"index": None}
    client.on_cell_start = lambda cell, cell_index: current.update(index=cell_index)

    def where() -> str:
        index = current["index"]
        if index is None:
            return f"{path.name}"
        first = next((line for line in nb.cells[index].source.splitlines() if line.strip()), "")
        return f"{path.name}, cell {index + 1} ({_one_line(first, 60)!r})"

    # The kernel inherits this process's environment (POEMS_DIR included) when it starts.
    previous = os.environ.get("COURSE_FAST")
    os.environ["COURSE_FAST"] = "1" if fast else "0"
    start = time.perf_counter()
    try:
        client.execute(**_encryption())
    except CellExecutionError as e:
        raise NotebookError(f"{where()} failed: {e.ename}: {_one_line(e.evalue)}") from None
    except TimeoutError:
        raise NotebookError(f"{where()} ran past the {CELL_TIMEOUT} s cell timeout") from None
    except DeadKernelError as e:
        raise NotebookError(f"{where()}: the kernel died ({_one_line(e)})") from None
    finally:
        if previous is None:
            os.environ.pop("COURSE_FAST", None)
        else:
            os.environ["COURSE_FAST"] = previous
    seconds = time.perf_counter() - start
    if save:
        # Which settings produced the saved outputs: the tests insist on the default ones.
        nb.metadata["course"] = {"fast_mode": fast, "code": code_fingerprint(), "cells": cells_fingerprint(nb)}
        nbformat.validate(nb)
        nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, RunNotebooksConfig, argv, "Execute the course notebooks and save their outputs in place.")


def run(config: RunNotebooksConfig, explicit: set[str]) -> int:
    paths = notebook_paths(list(config.names))
    if not paths:
        raise UserError(f"no notebooks (NN_*.ipynb) in {NOTEBOOKS}")
    mode = "fast" if config.fast else "default"
    total = 0.0
    try:
        for path in paths:
            seconds = execute_notebook(path, fast=config.fast, save=not config.check)
            total += seconds
            saved = "not saved" if config.check else "saved"
            print(f"{path.name}: {seconds:.1f} s ({mode} settings, {saved})", flush=True)
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if len(paths) > 1:
        print(f"total: {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

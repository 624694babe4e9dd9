"""Execute the course notebooks top to bottom and save their outputs in place.

    python notebooks/run_notebooks.py                      # every notebooks/NN_*.ipynb, default settings
    python notebooks/run_notebooks.py 02_model.ipynb       # just one (the .ipynb may be left off)
    python notebooks/run_notebooks.py --fast               # COURSE_FAST=1: tiny runs, under a minute each
    python notebooks/run_notebooks.py --check --fast       # execute without saving (what the tests do)

Each notebook runs in a fresh `python3` kernel whose working directory is notebooks/,
with COURSE_FAST set to 1 (--fast) or 0 (otherwise) in its environment. The wall time of
each is printed. A failing cell stops the run with one line naming the notebook and
the cell; nothing is saved for a notebook that failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

NOTEBOOKS = Path(__file__).resolve().parent
CELL_TIMEOUT = 900  # seconds per cell: generous, the default-mode training cells take a few minutes


class NotebookError(Exception):
    """A notebook could not be found or failed to run; the message is one line."""


def notebook_paths(names: list[str] | None = None) -> list[Path]:
    """The notebooks to run: the named ones (in notebooks/ or as paths), else every NN_*.ipynb in order."""
    if not names:
        return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    paths = []
    for name in names:
        candidates = [Path(name), NOTEBOOKS / name, NOTEBOOKS / f"{name}.ipynb"]
        path = next((p for p in candidates if p.suffix == ".ipynb" and p.is_file()), None)
        if path is None:
            raise NotebookError(f"{name}: no such notebook in {NOTEBOOKS}")
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
        nb.metadata["course"] = {"fast_mode": fast}
        nbformat.validate(nb)
        nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute the course notebooks and save their outputs in place.")
    parser.add_argument("names", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb, in order)")
    parser.add_argument("--fast", action="store_true", help="run with COURSE_FAST=1 (tiny settings, under a minute each)")
    parser.add_argument("--check", action="store_true", help="execute without saving the outputs (for CI)")
    args = parser.parse_args(argv)
    try:
        paths = notebook_paths(args.names)
        if not paths:
            raise NotebookError(f"no notebooks (NN_*.ipynb) in {NOTEBOOKS}")
        mode = "fast" if args.fast else "default"
        total = 0.0
        for path in paths:
            seconds = execute_notebook(path, fast=args.fast, save=not args.check)
            total += seconds
            saved = "not saved" if args.check else "saved"
            print(f"{path.name}: {seconds:.1f} s ({mode} settings, {saved})", flush=True)
        if len(paths) > 1:
            print(f"total: {total:.1f} s")
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

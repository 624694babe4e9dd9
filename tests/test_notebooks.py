"""The course notebooks: each runs top to bottom in fast mode, and each is committed with its outputs.

Every notebooks/NN_*.ipynb is picked up, so a new notebook is tested without touching
this file. Execution uses tools/run_notebooks.py (COURSE_FAST=1, working directory
notebooks/) and saves nothing.
"""

from __future__ import annotations

import nbformat
import pytest

from tools import run_notebooks

NOTEBOOKS = run_notebooks.NOTEBOOKS
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def test_notebooks_found():
    assert PATHS, f"no NN_*.ipynb notebooks in {NOTEBOOKS}"
    assert run_notebooks.notebook_paths() == PATHS


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_runs_in_fast_mode(path):
    try:
        run_notebooks.execute_notebook(path, fast=True, save=False)
    except run_notebooks.NotebookError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_committed_with_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [(i, cell) for i, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code"]
    assert code, f"{path.name}: no code cells"
    unexecuted = [i for i, cell in code if cell.execution_count is None]
    assert not unexecuted, (
        f"{path.name}: cells {unexecuted} have not been executed; run python -m tools.run_notebooks {path.name}"
    )
    assert nb.metadata.get("course", {}).get("fast_mode") is False, (
        f"{path.name}: not saved from a default-settings run; run python -m tools.run_notebooks {path.name}"
    )
    errors = [i for i, cell in code if any(out.get("output_type") == "error" for out in cell.outputs)]
    assert not errors, f"{path.name}: cells {errors} are saved with an error output"

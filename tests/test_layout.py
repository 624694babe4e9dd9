"""The import rules that keep one room per idea: nothing imports a script, and nothing that
only samples or evaluates pulls in the training loop."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = {"pretrain", "finetune", "align", "sample", "evaluate", "bench", "merge_lora", "compare_lora"}
MODULES = sorted([*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("data/*.py"), REPO_ROOT / "notebooks" / "course.py"])


def imported(path) -> set[str]:
    """Top-level names of the modules a file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(REPO_ROOT)) for p in MODULES])
def test_no_module_imports_a_script(path):
    allowed = {"pretrain", "finetune", "align"} if path.name == "course.py" else set()  # it runs them via main()
    assert not (imported(path) & SCRIPTS) - allowed


@pytest.mark.parametrize("module", ["sample", "evaluate", "generation", "checkpoint", "losses", "merge_lora"])
def test_sampling_and_evaluating_never_load_the_training_loop(module):
    """Not even indirectly: importing them leaves the loop and its run files unloaded."""
    check = f"import sys, {module}; print(sorted(m for m in ('training', 'run_files', 'distributed') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def scripts_used_beyond_main(source: str) -> list[str]:
    """`script.name` uses, other than `script.main`, of the scripts a piece of code imports,
    and any `from script import ...`."""
    tree = ast.parse(source)
    as_modules = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                  for alias in node.names if alias.name in SCRIPTS}
    borrowed = [f"from {node.module} import" for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS]
    borrowed += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id in as_modules and node.attr != "main"]
    return borrowed


def test_course_helpers_only_run_scripts_through_main():
    assert not scripts_used_beyond_main((REPO_ROOT / "notebooks" / "course.py").read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_notebooks_borrow_no_function_from_a_script(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))  # magics
    assert not scripts_used_beyond_main(code)

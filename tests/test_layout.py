"""The house's folder rule, read from the imports themselves (no list of names to keep up):

    data/            the poems, tokenizers, instruction format, tasks, forms: imports only data/
    model.py         the transformer: imports nothing of the project
    tanggpt/         the library: data/, model.py and itself, never a command
    commands         every other root .py file, tools/, poems/download.py: the library,
                     data/ and model.py, never another command

so a command can be read as a thin main over the library, and the library moved or tested
without any script. Nothing that only samples or evaluates pulls in the training loop.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

ROOT_COMMANDS = {p.stem for p in REPO_ROOT.glob("*.py") if p.name != "model.py"}
TOOLS = {p.stem for p in (REPO_ROOT / "tools").glob("*.py") if p.name != "__init__.py"}
PROJECT = {"data", "model", "tanggpt", "tools", "poems", *ROOT_COMMANDS}
LIBRARY = {"data", "model", "tanggpt"}
ALLOWED = {"data": {"data"}, "model": set(), "library": LIBRARY, "command": LIBRARY}


def layer(path: Path) -> str:
    relative = path.relative_to(REPO_ROOT)
    if relative.parts[0] == "data":
        return "data"
    if relative.parts[0] == "tanggpt":
        return "library"
    return "model" if relative == Path("model.py") else "command"


def source_files() -> list[Path]:
    files = [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("data/*.py"), *REPO_ROOT.glob("tanggpt/*.py"),
             *REPO_ROOT.glob("tools/*.py"), *REPO_ROOT.glob("poems/*.py")]
    return sorted(p for p in files if p.name != "__init__.py" or p.parent.name == "data")


def imported(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (a lazy import counts too), as
    top-level names, except that tools.X counts as X (a tool is a command)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        if isinstance(node, ast.ImportFrom) and node.module == "tools":  # from tools import bench
            modules = [f"tools.{alias.name}" for alias in node.names]
        for module in modules:
            top, _, rest = module.partition(".")
            names.add(rest.split(".")[0] if top == "tools" and rest else top)
    return names & (PROJECT | TOOLS)


FILES = source_files()


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO_ROOT)) for p in FILES])
def test_each_file_imports_only_the_layers_below_it(path):
    assert imported(path) <= ALLOWED[layer(path)], f"{layer(path)} imports {sorted(imported(path) - ALLOWED[layer(path)])}"


def test_every_root_file_but_the_model_is_a_command():
    """A root .py file is something a student types: it runs as a script, and no module imports it."""
    for path in REPO_ROOT.glob("*.py"):
        if path.name != "model.py":
            assert 'if __name__ == "__main__":' in path.read_text(encoding="utf-8"), path.name
    assert {p.name for p in REPO_ROOT.glob("*.py")} >= {"model.py", "pretrain.py", "finetune.py", "align.py",
                                                        "sample.py", "evaluate.py"}


def test_the_rule_sees_a_violation(tmp_path):
    """The checker itself: a library module importing a command, or data/ importing the library, is caught."""
    sneaky = REPO_ROOT / "tanggpt" / "training.py"
    assert layer(sneaky) == "library" and "pretrain" not in ALLOWED["library"]
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import pretrain\n    from tools import bench\n    from tanggpt.cli import flag\n")
    assert imported(probe) == {"pretrain", "bench", "tanggpt"}


@pytest.mark.parametrize("module", ["sample", "evaluate", "tanggpt.generation", "tanggpt.checkpoint",
                                    "tanggpt.losses", "tools.merge_lora"])
@pytest.mark.slow
def test_sampling_and_evaluating_never_load_the_training_loop(module):
    """Not even indirectly: importing them leaves the loop and its run files unloaded."""
    loop = ("tanggpt.training", "tanggpt.run_files", "tanggpt.distributed")
    check = f"import sys, {module}; print(sorted(m for m in {loop!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


COMMANDS = ROOT_COMMANDS | TOOLS


def scripts_used_beyond_main(source: str) -> list[str]:
    """`script.name` uses, other than `script.main`, of the commands a piece of code imports,
    and any `from script import ...`."""
    tree = ast.parse(source)
    as_modules = {alias.asname or alias.name for node in ast.walk(tree)
                  if isinstance(node, ast.Import) or isinstance(node, ast.ImportFrom) and node.module == "tools"
                  for alias in node.names if alias.name in COMMANDS}  # import pretrain; from tools import bench
    borrowed = [f"from {node.module} import" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module in COMMANDS or (node.module or "").startswith("tools."))]
    borrowed += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id in as_modules and node.attr != "main"]
    return borrowed


def test_a_borrowed_function_is_seen():
    assert scripts_used_beyond_main("from tools import bench\nbench.run(1)") == ["bench.run"]
    assert scripts_used_beyond_main("import finetune\nfinetune.main([])\nfrom tools.bench import run") == [
        "from tools.bench import"]


def test_course_helpers_only_run_scripts_through_main():
    course = REPO_ROOT / "notebooks" / "course.py"
    assert imported(course) <= LIBRARY | {"pretrain", "finetune", "align", "rl"}
    assert not scripts_used_beyond_main(course.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.name)
def test_notebooks_borrow_no_function_from_a_script(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))  # magics
    assert not scripts_used_beyond_main(code)

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


def test_the_plots_font_has_the_poems_characters():
    """notebooks/course.py draws Chinese labels with the CJK font mplfonts ships: the file is
    installed, and it has a glyph for simplified and traditional characters alike (matplotlib's
    own DejaVu Sans has none, and draws boxes)."""
    from pathlib import Path

    import mplfonts
    from matplotlib.ft2font import FT2Font

    from notebooks import course

    path = Path(mplfonts.__file__).parent / "fonts" / course.CJK_FONT_FILE
    assert path.is_file(), f"{path}: not installed; pip install -r requirements.txt"
    font = FT2Font(str(path))
    assert all(font.get_char_index(ord(ch)) for ch in "春夏秋冬五言絕句律詩损失学习率平仄"), "a character has no glyph"
    import matplotlib

    dejavu = FT2Font(matplotlib.font_manager.findfont("DejaVu Sans"))
    assert not dejavu.get_char_index(ord("春"))  # what the font is for: the default cannot draw it


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_no_plot_was_drawn_with_missing_glyphs(path):
    """Matplotlib warns "Glyph ... missing from font(s)" when a label has a character its font
    lacks: the saved outputs must hold no such warning (every label drawn with the CJK font)."""
    nb = nbformat.read(path, as_version=4)
    warned = [i for i, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code"
              for out in cell.outputs if "missing from font" in out.get("text", "")]
    assert not warned, f"{path.name}: cells {sorted(set(warned))} drew characters their font lacks"


def test_code_fingerprint_follows_code_not_comments(tmp_path, monkeypatch):
    """The stamp changes with a line of code in the library, not with a comment or a docstring."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "course.py").write_text("X = 1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "tanggpt").mkdir()
    library = tmp_path / "tanggpt" / "losses.py"
    library.write_text('"""Losses."""\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "bench.py").write_text("A = 1\n")
    monkeypatch.setattr(run_notebooks, "NOTEBOOKS", tmp_path / "notebooks")
    before = run_notebooks.code_fingerprint()
    library.write_text('"""Losses, reworded."""\n\n\ndef f(x):  # a comment\n    """Two times x."""\n    return 2 * x\n')
    assert run_notebooks.code_fingerprint() == before
    (tmp_path / "tools" / "bench.py").write_text("A = 2\n")  # tools/ is not what the notebooks ran
    assert run_notebooks.code_fingerprint() == before
    library.write_text('"""Losses."""\n\ndef f(x):\n    """Twice x."""\n    return 3 * x\n')
    assert run_notebooks.code_fingerprint() != before
    library.write_text('"""Losses."""\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    (tmp_path / "notebooks" / "course.py").write_text("X = 2\n")
    assert run_notebooks.code_fingerprint() != before


def _prose(markdown: str) -> str:
    """A markdown cell's prose: without code blocks (fenced or indented), formulas, code
    spans, link targets and HTML tags."""
    import re

    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]+\$", " ", text, flags=re.S)  # formulas
    text = re.sub(r"^(    |\t).*$", " ", text, flags=re.M)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return re.sub(r"<[^>]+>", " ", text)


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_prose_is_chinese(path):
    """The course's readers read Chinese first: each notebook's narrative is Chinese, English
    only in the bracketed terms of the glossary (docs/glossary.md), names and commands. Counted
    on the prose alone, a Chinese sentence holds several characters for each English word it
    brackets; an English paragraph holds none."""
    import re

    nb = nbformat.read(path, as_version=4)
    prose = "\n".join(_prose(cell.source) for cell in nb.cells if cell.cell_type == "markdown")
    chinese = len(re.findall(r"[\u4e00-\u9fff]", prose))
    english = len(re.findall(r"[A-Za-z]{2,}", prose))
    assert chinese >= 4 * english, f"{path.name}: {chinese} Chinese characters, {english} English words in its prose"
    english_paragraphs = [p[:60] for p in prose.split("\n\n")
                          if len(re.findall(r"[A-Za-z]{2,}", p)) > 12 and not re.search(r"[\u4e00-\u9fff]", p)]
    assert not english_paragraphs, f"{path.name}: paragraphs in English: {english_paragraphs}"


def test_without_the_font_labels_fall_back_to_ascii_with_one_note(monkeypatch, capsys):
    """No mplfonts installed: one printed note, and zh() gives the ASCII label, never boxes."""
    import sys

    from notebooks import course

    monkeypatch.setitem(sys.modules, "mplfonts", None)  # import mplfonts now raises ImportError
    assert course._use_cjk_font() is False
    note = capsys.readouterr().out.strip().splitlines()
    assert len(note) == 1 and "mplfonts" in note[0]
    monkeypatch.setattr(course, "CJK", False)
    assert course.zh("春", "spring") == "spring"
    monkeypatch.setattr(course, "CJK", True)
    assert course.zh("春", "spring") == "春"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_notebook_was_executed_against_todays_code(path):
    """Each saved notebook carries the fingerprints of the code it ran against and of its own code
    cells (run_notebooks): a notebook older than either fails here."""
    nb = nbformat.read(path, as_version=4)
    cells = nb.metadata.get("course", {}).get("cells")
    assert cells == run_notebooks.cells_fingerprint(nb), (
        f"{path.name}: a code cell was changed after the notebook was executed; run python -m tools.run_notebooks "
        f"{path.name}")
    stamp = nb.metadata.get("course", {}).get("code")
    assert stamp == run_notebooks.code_fingerprint(), (
        f"{path.name}: executed against other code (stamp {stamp}, the code now {run_notebooks.code_fingerprint()}); "
        f"run python -m tools.run_notebooks {path.name}"
    )


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_saved_outputs_hold_no_machine_path(path):
    """Outputs print paths relative to the notebook: a reader's machine is not the author's."""
    import re

    nb = nbformat.read(path, as_version=4)
    found = [i for i, cell in enumerate(nb.cells, start=1) if cell.cell_type == "code" for out in cell.outputs
             if re.search(r"(?<![\w.])/(home|work|Users|root|tmp|usr|opt)/", out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))]
    assert not found, f"{path.name}: cells {sorted(set(found))} print an absolute path"


def test_notebook_prose_uses_the_glossarys_script():
    """One glossary, one script: the notes are simplified Chinese. The poems and their titles
    stay traditional, but a term of docs/glossary.md in its traditional spelling is a slip."""
    glossary = (run_notebooks.NOTEBOOKS.parent / "docs" / "glossary.md").read_text(encoding="utf-8")
    traditional = {"对齐": "對齊", "适配": "適配", "损失": "損失", "词元": "詞元", "微调": "微調", "检查点": "檢查點",
                   "强化学习": "強化學習", "分词器": "分詞器", "采样": "採樣", "评估": "評估", "奖励": "獎勵", "词表": "詞表"}
    assert all(term in glossary for term in traditional), "the glossary lost a term this test checks"
    slips = {}
    for path in PATHS:
        prose = "\n".join(_prose(cell.source) for cell in nbformat.read(path, as_version=4).cells
                           if cell.cell_type == "markdown")
        if found := [t for t in traditional.values() if t in prose]:
            slips[path.name] = found
    assert not slips, f"traditional spellings of glossary terms: {slips}"

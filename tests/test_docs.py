"""The READMEs and docs/: short, in sync between Chinese and English, and true to the tree.

README.md (Chinese) and README.en.md (English) say the same thing in two languages: the
same sections, the same code blocks (every command) and the same numbers. The file tree
they show lists every source file of the house, one line a file; every link and image
they and the docs pages point to exists.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT

READMES = {name: (REPO_ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "README.en.md")}
PAGES = {**READMES, **{f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((REPO_ROOT / "docs").glob("*.md"))}}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def prose(text: str) -> str:
    return FENCE.sub("", text)


def numbers(text: str) -> list[str]:
    """Every number written in digits outside the code blocks, link targets left out."""
    text = re.sub(r"\]\([^)]*\)", "]", prose(text))
    return re.findall(r"\d+(?:[.,]\d+)*", text)


@pytest.mark.parametrize("name", READMES)
def test_each_readme_is_short_and_links_the_other(name):
    text = READMES[name]
    assert text.count("\n") <= 250
    other = "README.en.md" if name == "README.md" else "README.md"
    assert f"({other})" in "\n".join(text.splitlines()[:5])


def test_the_two_readmes_have_the_same_sections_commands_and_numbers():
    zh, en = READMES["README.md"], READMES["README.en.md"]
    assert len(re.findall(r"^## ", zh, re.M)) == len(re.findall(r"^## ", en, re.M))
    assert code_blocks(zh) == code_blocks(en)
    assert sorted(numbers(zh)) == sorted(numbers(en))  # word order differs between the languages


def test_the_sync_check_sees_a_drift():
    """A number changed in one language only, or a command in one only, is caught."""
    en = READMES["README.en.md"]
    figure = numbers(en)[0]  # the first number of the prose, whatever it says today
    assert sorted(numbers(en.replace(figure, figure + "1", 1))) != sorted(numbers(en))
    assert code_blocks(en.replace("python pretrain.py", "python pretrain.py --max-iters 9", 1)) != code_blocks(en)


def tree(text: str) -> set[str]:
    block = next(b for b in code_blocks(text) if re.search(r"^model\.py\s", b, re.M))
    return {line.split()[0] for line in block.splitlines() if line.strip()}


@pytest.mark.parametrize("name", READMES)
def test_the_file_tree_lists_every_source_file(name):
    sources = {p.relative_to(REPO_ROOT).as_posix() for folder in ("", "data/", "tanggpt/", "tools/", "poems/")
               for p in REPO_ROOT.glob(f"{folder}*.py")} | {"notebooks/course.py"}
    assert tree(READMES[name]) == sources


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_image_exists(page):
    base = REPO_ROOT if page.startswith("README") else REPO_ROOT / "docs"
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose(PAGES[page]))
    missing = [t for t in targets if not t.startswith(("http://", "https://")) and not (base / t).exists()]
    assert not missing


def table_cells(row: str) -> int:
    """How many cells a Markdown table row has (a | inside `code` or escaped is not a border)."""
    return re.sub(r"`[^`]*`", "", row.replace("\\|", "")).strip().strip("|").count("|") + 1


@pytest.mark.parametrize("page", PAGES)
def test_every_table_has_as_many_cells_in_each_row_as_in_its_header(page):
    """A delimiter row (| --- |) with another number of cells than its header is no table at
    all to a Markdown renderer: the page shows the rows as plain lines."""
    lines = prose(PAGES[page]).splitlines()
    tables = [i for i, line in enumerate(lines) if re.match(r"^\|\s*:?-{3,}", line)]
    for i in tables:
        header = table_cells(lines[i - 1])
        end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith("|")), len(lines))
        rows = lines[i:end]  # the delimiter row and the body
        assert [table_cells(r) for r in rows] == [header] * len(rows), (page, lines[i - 1])


def test_every_image_is_shown_once_somewhere():
    """Each image on one page; the two READMEs are one page in two languages, showing the same ones."""
    shown = {page: re.findall(r"!\[[^\]]*\]\(([^)]+)\)", prose(text)) for page, text in PAGES.items()}
    assert shown["README.md"] == shown["README.en.md"]
    images = [i for page, found in shown.items() if page != "README.en.md" for i in found]
    assert images
    assert len(images) == len(set(images))

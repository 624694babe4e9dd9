"""The README: the images it shows exist (each shown once), and its layout names every module."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_every_image_exists_and_is_shown_once():
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert images
    assert len(images) == len(set(images)), [i for i in images if images.count(i) > 1]
    missing = [i for i in images if not (REPO_ROOT / i).is_file()]
    assert not missing


def test_layout_names_every_module():
    layout = README.split("## Layout", 1)[1].split("```")[1]
    listed = set(re.findall(r"^(\S+\.py)\b", layout, flags=re.M))
    modules = {p.name for p in REPO_ROOT.glob("*.py")}
    assert listed == modules
    library = {p.name for p in (REPO_ROOT / "tanggpt").glob("*.py")} - {"__init__.py"}
    assert library <= set(re.findall(r"\b(\w+\.py)\b", layout))

"""The README: the images it shows exist, each shown once."""

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


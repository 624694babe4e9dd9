"""Shared fixtures: the real corpus, loaded once per test session.

The corpus folder is $POEMS_DIR if set (CI sets it to ../shared/corpus/quan-tang-shi),
else ../shared/corpus/quan-tang-shi beside the repository if it exists, else poems/
(downloaded on first use, like the training scripts do).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from data.corpus import DEFAULT_POEMS_DIR, all_poems, load_corpus, tokenizer_texts
from data.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def corpus_dir() -> Path:
    if os.environ.get("POEMS_DIR"):
        return Path(os.environ["POEMS_DIR"])
    shared = REPO_ROOT.parent / "shared" / "corpus" / "quan-tang-shi"
    return shared if shared.is_dir() else DEFAULT_POEMS_DIR


@pytest.fixture(scope="session")
def splits():
    return load_corpus(corpus_dir(), verbose=False)


@pytest.fixture(scope="session")
def poems(splits):
    return all_poems(splits)


@pytest.fixture(scope="session")
def char_tokenizer(poems):
    return build_tokenizer("char", tokenizer_texts(poems))


@pytest.fixture(scope="session")
def cl100k_tokenizer(poems):
    return build_tokenizer("cl100k_base", tokenizer_texts(poems))

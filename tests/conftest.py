"""Shared fixtures: the real corpus, loaded once per test session.

The corpus folder is data.corpus.local_corpus_dir(): $POEMS_DIR if set (CI sets it to
../shared/corpus/quan-tang-shi), else that folder beside the repository if it exists,
else poems/ (downloaded on first use, like the training scripts do).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from data.corpus import all_poems, load_corpus, local_corpus_dir
from data.tasks import tokenizer_texts
from data.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def splits():
    return load_corpus(local_corpus_dir(), verbose=False)


@pytest.fixture(scope="session")
def poems(splits):
    return all_poems(splits)


@pytest.fixture(scope="session")
def char_tokenizer(poems):
    return build_tokenizer("char", tokenizer_texts(poems))


@pytest.fixture(scope="session")
def cl100k_tokenizer(poems):
    return build_tokenizer("cl100k_base", tokenizer_texts(poems))


# A tiny model that trains in seconds, for end-to-end tests of the scripts.
TINY = ["--no-compile", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--dtype", "float32", "--eval-iters", "2", "--warmup-iters", "5", "--lr", "3e-3"]


@pytest.fixture(scope="session")
def small_poems(tmp_path_factory) -> Path:
    """Two files of the real corpus (2,000 poems): enough text, quick to load."""
    folder = tmp_path_factory.mktemp("poems")
    for name in ("poet.tang.0.json", "poet.tang.1000.json"):
        shutil.copy(local_corpus_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, small_poems) -> Path:
    """A tiny pretrained checkpoint (block 96, so most short poems fit an instruction sample)."""
    import pretrain

    out = tmp_path_factory.mktemp("pretrained") / "ckpt.pt"
    pretrain.main(["--poems", str(small_poems), "--out", str(out), *TINY, "--block-size", "96",
                   "--max-iters", "30", "--eval-interval", "30"])
    return out


@pytest.fixture(scope="session")
def tiny_tuned(tmp_path_factory, small_poems, tiny_pretrained) -> Path:
    """tiny_pretrained after a few steps of instruction tuning."""
    import finetune

    out = tmp_path_factory.mktemp("tuned") / "ckpt_sft.pt"
    finetune.main(["--init", str(tiny_pretrained), "--poems", str(small_poems), "--out", str(out), "--no-compile",
                   "--dtype", "float32", "--batch-size", "4", "--max-iters", "6", "--warmup-iters", "2",
                   "--sample-tokens", "8"])
    return out


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory, small_poems, tiny_pretrained) -> Path:
    """tiny_pretrained after a few steps of tuning on conversations (finetune.py --format chat)."""
    import finetune

    out = tmp_path_factory.mktemp("chat") / "ckpt_chat.pt"
    finetune.main(["--init", str(tiny_pretrained), "--poems", str(small_poems), "--out", str(out), "--format", "chat",
                   "--dtype", "float32", "--batch-size", "4", "--max-iters", "4", "--warmup-iters", "2",
                   "--sample-tokens", "8"])
    return out

"""Untrained tiny checkpoints written in a blink, for tests of what sample.py and evaluate.py
refuse or keep apart: a tokenizer, a block_size or an adapter layout, not trained weights."""

from __future__ import annotations

from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from model import GPT, GPTConfig
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer, model_checkpoint, model_fingerprint, save_checkpoint
from tanggpt.lora import add_adapters


def write_checkpoint(path: Path, tokenizer: Tokenizer, kind: str = "sft", block_size: int = 96, seed: int = 0) -> Path:
    """A 1-layer model of `kind` with random weights (seeded), saved at `path`."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(path, model_checkpoint(kind, model, tokenizer))
    return path


def write_adapters(path: Path, base: Path, recorded_base: Path | None = None) -> Path:
    """Rank-2 LoRA adapters on the checkpoint `base`, saved at `path` as finetune.py --lora-rank
    saves them; `recorded_base`: the base path they record, if not `base` (as if it had moved)."""
    model, tokenizer = model_and_tokenizer(load_checkpoint(base), base)
    spec = {"rank": 2, "alpha": 4.0, "targets": "all", "dropout": 0.0, "token_ids": [],
            "base": str((recorded_base or base).resolve()), "base_fingerprint": model_fingerprint(model.state_dict())}
    add_adapters(model, 2, 4.0, "all", 0.0, [])
    save_checkpoint(path, model_checkpoint("sft", model, tokenizer, lora=spec))
    return path

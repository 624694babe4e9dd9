"""Batch builders: token streams -> (inputs, targets) tensors for training."""

from __future__ import annotations

import numpy as np
import torch


def random_windows(
    tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pretraining batch: `batch_size` random windows of `block_size + 1` tokens from one stream.

    Inputs are each window's first block_size tokens, targets the same shifted left by
    one: position t learns to predict token t + 1. Windows start anywhere, so they
    cross poem boundaries, which is how the model learns what follows a poem's end.
    """
    if len(tokens) < block_size + 1:
        raise ValueError(f"token stream of {len(tokens)} tokens is too short for block_size {block_size}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    offsets = np.arange(block_size + 1)
    windows = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]

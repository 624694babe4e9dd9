"""What the speed tools (tools/bench.py, tools/profile_step.py) share: the model they
measure, built from the same flags, the line that names what was measured, and a clock
that waits for the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model import GPT, GPTConfig
from tanggpt.cli import RuntimeConfig, flag
from tanggpt.device import Runtime, setup_runtime


def sync(device: torch.device) -> None:
    """Wait until the device has finished the queued work, so a clock read after it is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class ReferenceModelConfig(RuntimeConfig):
    """The flags of the model a speed tool measures; the defaults are the reference config."""

    vocab_size: int = flag(GPTConfig.vocab_size, "the char vocabulary of the Tang corpus (the model's default)")
    n_layer: int = flag(4, "transformer blocks")
    n_head: int = flag(4, "attention heads")
    n_embd: int = flag(256, "model width")
    block_size: int = flag(128, "context length")
    batch_size: int = flag(32, "training batch size (sequences per step)")


def reference_model(args: ReferenceModelConfig) -> tuple[Runtime, GPT]:
    """The runtime the flags ask for, and a freshly initialised model of their shape on it (seed 0)."""
    runtime = setup_runtime(args.device, args.dtype)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    return runtime, GPT(config).to(runtime.device)


def describe(model: GPT, runtime: Runtime, args: ReferenceModelConfig) -> str:
    """The first line a speed tool prints: the path it measured and the model's shape."""
    return (f"device {runtime.describe()}, {torch.get_num_threads()} threads; {model.num_params():,} parameters "
            f"({args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}), "
            f"batch {args.batch_size}")

"""What the speed tools (tools/bench.py, tools/profile_step.py) share: the model they
measure, built from the same flags, the line that names what was measured, and a clock
that waits for the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data.errors import UserError
from model import GPT, GPT2_BLOCK, GPTConfig
from tanggpt.cli import RuntimeConfig, flag, require_positive, with_flag_names
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
    n_layer: int = flag(GPTConfig.n_layer, "transformer blocks")
    n_head: int = flag(GPTConfig.n_head, "attention heads")
    n_embd: int = flag(GPTConfig.n_embd, "model width")
    block_size: int = flag(GPTConfig.block_size, "context length")
    gpt2: bool = flag(False, "GPT-2's block (model.GPT2_BLOCK: learned positions, LayerNorm, GELU) instead of "
                             "the default one")
    # batch_size and optimizer: pretrain.py's defaults
    batch_size: int = flag(16, "training batch size (sequences per step)")
    optimizer: str = flag("muon", "the training step's optimizer: adamw or muon (tanggpt/muon.py)",
                          choices=["adamw", "muon"])


    def validate(self) -> None:
        """Refuse a model the flags cannot build, in one line naming them, before anything loads or is timed."""
        require_positive(self, ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size"))
        self.model_config()

    def model_config(self) -> GPTConfig:
        try:
            return GPTConfig(vocab_size=self.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                             n_head=self.n_head, n_embd=self.n_embd, **(GPT2_BLOCK if self.gpt2 else {}))
        except ValueError as e:  # GPTConfig names its fields; the user typed flags
            raise UserError(f"--n-head {self.n_head} --n-embd {self.n_embd}"
                            f"{'' if self.gpt2 else ' (the default block: RoPE)'}: "
                            f"{with_flag_names(str(e), type(self))}") from None


def reference_model(args: ReferenceModelConfig) -> tuple[Runtime, GPT]:
    """The runtime the flags ask for, and a freshly initialised model of their shape on it (seed 0)."""
    config = args.model_config()
    runtime = setup_runtime(args.device, args.dtype)
    torch.manual_seed(0)
    return runtime, GPT(config).to(runtime.device)


def describe(model: GPT, runtime: Runtime, args: ReferenceModelConfig) -> str:
    """The first line a speed tool prints: the path it measured and the model's shape."""
    return (f"device {runtime.describe()}, {torch.get_num_threads()} threads; {model.num_params():,} parameters "
            f"({args.n_layer} layers, {args.n_head} heads, {args.n_embd} wide, block {args.block_size}, "
            f"{'GPT-2' if args.gpt2 else 'the default'} block), batch {args.batch_size}, {args.optimizer}")

"""Pretraining (预训练): teach a GPT to continue Tang poetry.

    python pretrain.py                          # the default: a small model, ~15 min on a laptop CPU
    python pretrain.py --preset gpu             # a bigger model for a GPU
    python pretrain.py --preset gpt2            # GPT-2's block and the AdamW run this course made before
    python pretrain.py --resume                 # continue the run saved at --out
    torchrun --standalone --nproc_per_node=2 pretrain.py    # data-parallel

The model reads random windows of one long stream: every pretraining poem as title,
newline, lines, with a blank line between poems. It learns to continue text, and
since the stream has no end-of-text token, it never learns to stop: that is the
instruction-tuning stage's job (finetune.py).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch

from data import all_poems, build_tokenizer, load_corpus, pretrain_text
from data.batches import random_windows
from data.corpus import DEFAULT_POEMS_DIR, corpus_fingerprint, corpus_folder
from data.errors import UserError
from data.tasks import tokenizer_texts
from data.tokenizer import Tokenizer, check_tokenizer_name
from model import GPT, GPT2_BLOCK, GPTConfig
from tanggpt.checkpoint import PRETRAIN, check_same_inputs, model_and_tokenizer, resume_checkpoint
from tanggpt.cli import flag, flag_name, require_positive, restore_run_flags, resume_rule, run_cli
from tanggpt.device import Runtime, release_freed_memory
from tanggpt.generation import continue_text
from tanggpt.losses import bits_per_char
from tanggpt.run_files import RunFiles, refuse_inputs_as_outputs
from tanggpt.training import LOOP_FIXED, OPTIMIZER_HELP, Stage, TrainConfig, finished, start_runtime, train


@dataclass
class PretrainConfig(TrainConfig):
    tokenizer: str = flag("char", "char, or a tiktoken encoding (gpt2, cl100k_base, o200k_base, ...)")
    compile: bool | None = flag(None, "torch.compile the model; auto: on CUDA and on a CPU training in bf16, where it "
                                      "is faster after ~30 s of compiling, not on a CPU in fp32, where it is slower "
                                      "(falls back to eager if compiling fails)")
    batch_size: int = flag(16, "sequences per micro-batch (per process under torchrun)")
    lr: float = flag(4e-3, "peak learning rate (with --optimizer muon: of the embeddings and gains)")
    muon_lr_scale: float = flag(5.0, "with --optimizer muon: the Muon matrices' learning rate is --lr times this")
    warmup_iters: int = flag(30, "steps of linear warmup from 0 to --lr")
    optimizer: str = flag("muon", OPTIMIZER_HELP, choices=["adamw", "muon"])
    max_iters: int = flag(1000, "optimizer steps")
    eval_iters: int = flag(20, "batches per split in each evaluation")
    block_size: int = flag(GPTConfig.block_size, "context length in tokens")
    n_layer: int = flag(GPTConfig.n_layer, "transformer blocks")
    n_head: int = flag(GPTConfig.n_head, "attention heads per block")
    n_embd: int = flag(GPTConfig.n_embd, "width of the residual stream")
    dropout: float = flag(0.0, "dropout probability")
    norm: str = flag(GPTConfig.norm, "rmsnorm, or layernorm (GPT-2)", choices=["layernorm", "rmsnorm"])
    activation: str = flag(GPTConfig.activation, "the MLP's activation: relu2 (ReLU squared) or gelu (GPT-2)",
                           choices=["gelu", "relu2"])
    positions: str = flag(GPTConfig.positions, "rope (rotary), or learned position embeddings (GPT-2)",
                          choices=["learned", "rope"])
    qk_norm: bool = flag(GPTConfig.qk_norm, "RMS-normalise queries and keys before attention (GPT-2: no)")
    tie_head: bool = flag(GPTConfig.tie_head, "the output head shares the token embedding's weights (as GPT-2)")
    sample_title: str = flag("春夜喜雨", "title the model continues at each evaluation")
    preset: str = flag("", "gpu: a GPU-sized model and schedule; gpt2: the run this course made before "
                           "docs/speed.md, GPT-2's block (learned positions, LayerNorm, GELU), 4 x 256, AdamW, batch "
                           "32, 1,100 steps (flags you give still win)", choices=["", "gpu", "gpt2"])


# Flags a preset changes unless given on the command line.
PRESETS = {
    "gpu": dict(
        n_layer=8, n_head=8, n_embd=512, block_size=256, dropout=0.1, batch_size=64, max_iters=10_000,
        lr=6e-4, min_lr=6e-5, warmup_iters=500, eval_interval=500, eval_iters=50, compile=True, optimizer="adamw",
    ),
    # The default run before docs/speed.md's measurements: GPT-2's block, 4 x 256, AdamW, batch 32.
    "gpt2": dict(**GPT2_BLOCK, n_layer=4, n_embd=256, optimizer="adamw", batch_size=32, lr=2e-3, warmup_iters=100,
                 max_iters=1100),
}
# A run started before a flag existed was trained with the value it had then.
BEFORE_THE_FLAG = {**GPT2_BLOCK, "optimizer": "adamw"}
# What --resume never changes: these decide which windows each step reads and which model
# reads them, so another value would not continue the same run.
RESUME_FIXED = {*LOOP_FIXED, "tokenizer", "block_size", "n_layer", "n_head", "n_embd",
                "dropout", "preset", "norm", "activation", "positions", "qk_norm", "tie_head"}


class PretrainStage(Stage):
    """Random windows of the token stream; evaluated on fixed windows of each split; sampled
    by continuing --sample-title."""

    def __init__(self, config: PretrainConfig, model: GPT, tokenizer: Tokenizer, streams: dict, runtime: Runtime,
                 rank: int, world_size: int, inputs: dict[str, str]):
        self.config, self.tokenizer, self.streams, self.runtime = config, tokenizer, streams, runtime
        self.rank, self.world_size, self.inputs = rank, world_size, inputs
        self.kind = PRETRAIN
        self.plot_title = f"pretraining: {model.num_params() / 1e6:.2f}M params, {tokenizer.name} tokenizer"
        self.max_val_loss = 2 * math.log(tokenizer.vocab_size)  # far worse than a uniform guess: diverged

    def checkpoint_extra(self) -> dict:
        return {"inputs": self.inputs}  # the corpus's fingerprint: a resumed run checks it is unchanged

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.runtime.device
        if device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def get_batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        # Seeded by (seed, step, micro-step, rank) alone: a resumed run draws the same windows.
        index = (step * config.grad_accum + micro_step) * self.world_size + self.rank
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        return self.to_device(*random_windows(self.streams["train"]["tokens"], config.batch_size, config.block_size,
                                              generator))

    @torch.no_grad()
    def evaluate(self, model: GPT) -> dict:
        config = self.config
        model.eval()
        figures = {}
        for name, key in (("train", "eval_train_loss"), ("val", "val_loss")):
            # The same batches at every evaluation, so the curve moves only with the model.
            generator = torch.Generator().manual_seed(config.seed + (1 if name == "val" else 2))
            stream = self.streams[name]
            losses = []
            for _ in range(config.eval_iters):
                x, y = random_windows(stream["tokens"], config.batch_size, config.block_size, generator)
                # In chunks of 8 rows: the same mean, a quarter of the activation memory.
                for xc, yc in zip(x.split(8), y.split(8)):
                    with self.runtime.autocast():
                        _, loss = model(*self.to_device(xc, yc))
                    losses.append(loss.item() * len(xc) / len(x))
            figures[key] = sum(losses) / config.eval_iters
            # Bits per character compares char and tiktoken runs.
            figures[f"{name}_bpc"] = bits_per_char(figures[key], len(stream["tokens"]), stream["chars"])
        model.train()
        return figures

    def sample(self, model: GPT, step: int) -> str:
        return continue_text(model, self.tokenizer, self.config.sample_title + "\n", self.runtime, 120, top_k=200,
                             seed=self.config.seed)


def resolve_config(config: PretrainConfig, explicit: set[str], ckpt: dict | None) -> list[str]:
    """Settle every flag before any work starts: a new run takes its preset's values (flags
    typed win), a resumed one the values it was started with (see --resume); then check
    them all. Returns notes to print."""
    if ckpt is not None:
        notes = restore_run_flags(config, explicit, ckpt["train_config"], RESUME_FIXED, config.out, BEFORE_THE_FLAG)
    else:
        notes = []
        for name, value in PRESETS.get(config.preset, {}).items():
            if name not in explicit:
                setattr(config, name, value)
    require_positive(config, ("max_iters", "eval_iters", "block_size", "n_layer", "n_head", "n_embd"))
    config.validate()
    model_config(config, vocab_size=1)  # a bad shape or tokenizer fails now, not after the corpus loads
    check_tokenizer_name(config.tokenizer)
    return notes


def model_config(config: PretrainConfig, vocab_size: int) -> GPTConfig:
    try:
        return GPTConfig(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                         n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, norm=config.norm,
                         activation=config.activation, positions=config.positions, qk_norm=config.qk_norm,
                         tie_head=config.tie_head)
    except ValueError as e:  # GPTConfig names its fields; the user typed flags
        raise UserError(re.sub(r"\b(n_layer|n_head|n_embd|block_size|dropout)\b", lambda m: flag_name(m[1]),
                               str(e))) from None


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, PretrainConfig, argv, __doc__.splitlines()[0], epilog=resume_rule(RESUME_FIXED))


def run(config: PretrainConfig, explicit: set[str]) -> dict:
    ckpt = resume_checkpoint(config.out, PRETRAIN) if config.resume else None
    notes = resolve_config(config, explicit, ckpt)
    files = RunFiles(config.out)
    refuse_inputs_as_outputs(files.outputs(), {}, config.poems or DEFAULT_POEMS_DIR)
    notes += files.prepare(config.resume, config.overwrite)
    dist_info, runtime = start_runtime(config)
    master = dist_info.is_master
    for note in notes if master else []:
        print(note)
    if finished(ckpt, config.max_iters, config.out, "a larger --max-iters", master):
        return {}

    started = time.perf_counter()
    splits = load_corpus(config.poems or None, verbose=master)
    inputs = {"--poems": corpus_fingerprint(corpus_folder(config.poems or None))}
    check_same_inputs(ckpt, inputs, config.out)
    if ckpt is not None:
        model, tokenizer = model_and_tokenizer(ckpt, config.out, flag_name="--resume")
    else:
        tokenizer = build_tokenizer(config.tokenizer, tokenizer_texts(all_poems(splits)))
        model = GPT(model_config(config, tokenizer.vocab_size))
    model.to(runtime.device)
    streams = {}
    for name, split in (("train", "pretrain_train"), ("val", "pretrain_val")):
        text = pretrain_text(splits[split])
        streams[name] = {"tokens": tokenizer.encode_array(text), "chars": len(text)}
        if len(streams[name]["tokens"]) <= config.block_size:
            raise UserError(f"--poems: the {split} split has only {len(streams[name]['tokens'])} tokens, "
                            f"fewer than --block-size {config.block_size}")
    del splits  # the token streams are all training needs; free the poems
    release_freed_memory()
    stage = PretrainStage(config, model, tokenizer, streams, runtime, dist_info.rank, dist_info.world_size,
                          inputs)

    if master:
        start = ckpt["step"] if ckpt else 0
        print(f"device {runtime.describe()}" + (f", {dist_info.world_size} processes" if dist_info.world_size > 1 else ""))
        print(f"model {model.num_params():,} parameters: {config.n_layer} layers, {config.n_head} heads, "
              f"{config.n_embd} wide, block {config.block_size}")
        print(f"tokenizer {tokenizer.name}: vocabulary {tokenizer.vocab_size:,}")
        print(f"tokens: train {len(streams['train']['tokens']):,}, val {len(streams['val']['tokens']):,}")
        tokens_per_step = config.batch_size * config.block_size * config.grad_accum * dist_info.world_size
        print(f"{tokens_per_step:,} tokens per step ({config.batch_size} x {config.block_size} x "
              f"{config.grad_accum} accumulation x {dist_info.world_size} processes); steps {start:,} -> {config.max_iters:,}")
    figures = train(model, config, stage, runtime, config.max_iters, ckpt, dist_info)
    if master and figures:
        minutes = (time.perf_counter() - started) / 60
        print(f"done in {minutes:.1f} min: val loss {figures['val_loss']:.4f} ({figures['val_bpc']:.3f} bits/char); "
              f"checkpoint {config.out}; next: python finetune.py --init {config.out}")
    return figures


if __name__ == "__main__":
    main()

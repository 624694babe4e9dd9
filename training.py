"""The training core shared by pretrain.py and finetune.py.

What both stages need, in one place: command-line flags from a config dataclass, the
optimizer and its learning-rate schedule, atomic checkpoints that resume exactly,
data-parallel training, and the loop itself with its progress bar, evaluations,
samples, JSONL log and loss plot. A stage supplies only what differs: its batches,
its evaluation and its samples.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.corpus import CorpusError
from data.instruct import InstructionDataError
from data.tokenizer import TokenizerError
from device import DeviceError, Runtime, setup_runtime
from model import GPT, GPTConfig


class TrainingError(Exception):
    """Bad flags, a bad checkpoint or a diverged run; the message is one line."""


# -----------------------------------------------------------------------------
# Configuration: a dataclass whose fields become --kebab-case flags


def flag(default, help: str, **kwargs):
    """A config field with its --help text."""
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RuntimeConfig:
    """Flags every script has: where to run, in which precision."""

    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag("auto", "auto (bf16 where the device has fast bf16, else fp32), float32 or bfloat16")


@dataclass
class TrainConfig(RuntimeConfig):
    """Flags every training stage has. A stage's config subclasses this one."""

    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    out: str = flag("ckpt.pt", "checkpoint path; the log, loss plot and samples are written beside it")
    resume: bool = flag(False, "continue from the checkpoint at --out")
    compile: bool = flag(False, "torch.compile the model (faster steps after a slower start)")
    seed: int = flag(1337, "seed for initialisation, batches and samples")
    batch_size: int = flag(32, "sequences per micro-batch (per process under torchrun)")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(1e-3, "peak learning rate")
    min_lr: float = flag(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(100, "steps of linear warmup from 0 to --lr")
    weight_decay: float = flag(0.1, "AdamW weight decay, on weight matrices only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)")
    eval_interval: int = flag(250, "evaluate, sample and checkpoint every this many steps")
    log_interval: int = flag(10, "write a train-loss record to the JSONL log every this many steps")

    def validate(self) -> None:
        require_positive(self, ("batch_size", "grad_accum", "eval_interval", "log_interval"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TrainingError(f"--lr must be positive and --min-lr in [0, lr], got lr {self.lr}, min-lr {self.min_lr}")
        if self.warmup_iters < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise TrainingError("--warmup-iters, --grad-clip and --weight-decay must not be negative")


def require_positive(config: object, names: tuple[str, ...]) -> None:
    """Raise a one-line TrainingError naming the first flag among `names` that is not positive."""
    for name in names:
        if getattr(config, name) <= 0:
            raise TrainingError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")


def parse_config(cls: type, argv: list[str] | None, description: str) -> tuple[object, set[str]]:
    """Parse flags for the dataclass `cls`; return the config and the names given explicitly.

    Knowing which flags were typed lets a resumed run tell "you asked for a different
    model shape" (an error) from "you left the default" (keep the checkpoint's).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default, "help": f.metadata.get("help", "")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if f.type in (bool, "bool"):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__)
            parser.add_argument(name, type=kind or str, **kwargs)
    args = parser.parse_args(argv)
    explicit = {
        f.name
        for f in dataclasses.fields(cls)
        for arg in (argv if argv is not None else sys.argv[1:])
        if arg == "--" + f.name.replace("_", "-") or arg.startswith("--" + f.name.replace("_", "-") + "=")
        or arg == "--no-" + f.name.replace("_", "-")
    }
    return cls(**vars(args)), explicit


# -----------------------------------------------------------------------------
# Optimizer and schedule


def configure_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (>= 2 dims), none on biases and norms.

    Decay pulls weights toward zero; for matmul weights and embeddings that is useful
    regularisation, but for LayerNorm gains and biases it only fights their job.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass (on CPU since torch 2.4, and CUDA).
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type in ("cpu", "cuda"))


def lr_at(step: int, config: TrainConfig, max_iters: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters.

    Warmup climbs lr / (warmup + 1) per step, so step 0 already moves and the peak is
    reached at step warmup_iters itself, where the cosine starts, not one step early.
    """
    if step < config.warmup_iters:
        return config.lr * (step + 1) / (config.warmup_iters + 1)
    if step >= max_iters:
        return config.min_lr
    progress = (step - config.warmup_iters) / max(1, max_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


# -----------------------------------------------------------------------------
# Checkpoints: plain data only, written atomically


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write to a temporary file beside `path`, then rename over it.

    A rename within one folder is atomic: a crash mid-save leaves the previous
    checkpoint intact and at worst a stray temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


CHECKPOINT_KEYS = ("kind", "model", "model_config", "tokenizer")


def load_checkpoint(path: str | Path, flag_name: str = "--resume") -> dict:
    """Load a checkpoint with weights_only=True, or raise one clear line saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise TrainingError(f"{flag_name}: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a text file, a pickle of objects: all unusable
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise TrainingError(f"{flag_name}: {path} is not a readable checkpoint (truncated or not one): {reason}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise TrainingError(f"{flag_name}: {path} is not a checkpoint of this project (missing model or tokenizer)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# Data parallel: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def init_distributed(runtime_device: str) -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op without torchrun."""
    if "RANK" not in os.environ:
        return Distributed()
    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    use_cuda = runtime_device.startswith("cuda") or (runtime_device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist_info


def start_runtime(config: TrainConfig) -> tuple[Distributed, Runtime]:
    """Join torchrun's process group if there is one, pick device and precision, seed."""
    dist_info = init_distributed(config.device)
    device = config.device
    if dist_info.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{dist_info.local_rank}"  # one GPU per process
    runtime = setup_runtime(device, config.dtype)
    torch.manual_seed(config.seed)
    if runtime.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls that autocast leaves alone
        torch.backends.cudnn.allow_tf32 = True
    return dist_info, runtime


def release_freed_memory() -> None:
    """Hand memory Python has freed back to the operating system (Linux/glibc only).

    Parsing 25 MB of JSON makes many small objects; once they are freed, glibc keeps the
    pages for reuse and the process stays ~100 MB larger than it needs to be for the
    rest of training. malloc_trim returns them. Elsewhere this does nothing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# Errors that mean "bad input": printed as one line, exit code 2, no traceback.
USER_ERRORS = (CorpusError, TokenizerError, TrainingError, DeviceError, InstructionDataError)


def cli_main(run: Callable, config_cls: type, argv: list[str] | None, description: str) -> None:
    config, explicit = parse_config(config_cls, argv, description)
    try:
        run(config, explicit)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# Log, plot, samples: files beside the checkpoint


class RunFiles:
    """ckpt.pt -> ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt"""

    def __init__(self, out: str | Path):
        out = Path(out)
        stem = out.with_suffix("")
        self.checkpoint = out
        self.log = Path(f"{stem}.log.jsonl")
        self.plot = Path(f"{stem}.loss.png")
        self.samples = Path(f"{stem}.samples.txt")

    def start(self, resume_step: int | None) -> None:
        """A new run starts fresh files; a resumed run drops log records past its checkpoint."""
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            for path in (self.log, self.samples, self.plot):
                path.unlink(missing_ok=True)
            return
        if self.log.exists():
            kept = [r for r in self.records() if r["step"] <= resume_step]
            self.log.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")

    def append_log(self, record: dict) -> None:
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def append_sample(self, header: str, text: str) -> None:
        with open(self.samples, "a", encoding="utf-8") as f:
            f.write(f"=== {header}\n{text}\n\n")

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_plot(self, title: str) -> None:
        """Train and val loss against tokens seen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [(r["tokens"], r["train_loss"]) for r in records if "train_loss" in r]
        evals = [r for r in records if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train (batch)")
        if evals:
            ax.plot([r["tokens"] for r in evals], [r["eval_train_loss"] for r in evals], "o-", color="tab:blue",
                    ms=3, label="train (eval)")
            ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                    ms=3, label="val")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.plot.with_name("." + self.plot.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.plot)


# -----------------------------------------------------------------------------
# The loop


@dataclass
class Stage:
    """What a training stage plugs into the loop.

    get_batch(step, micro_step) -> (x, y) on the device. It must depend only on its
    arguments (and the rank), never on hidden state, so a resumed run sees exactly
    the batches an uninterrupted one would have.
    evaluate(model) -> dict of figures, including "val_loss" (lower is better).
    sample(model, step) -> text to print and append to the samples file.
    checkpoint_extra: stage data stored in every checkpoint (kind, tokenizer, ...).
    describe_step(step) names a point in training for the samples file ("step 500", "epoch 2").
    """

    get_batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[torch.nn.Module], dict]
    sample: Callable[[torch.nn.Module, int], str]
    checkpoint_extra: dict
    plot_title: str
    describe_step: Callable[[int], str] = lambda step: f"step {step}"
    sample_before_training: bool = False  # also sample the untrained model, as a "before" picture


class _StopFlag:
    """The first Ctrl-C asks the loop to save and stop at the next step boundary; a second one kills."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading_main():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint at the end of this step (Ctrl-C again to quit at once)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def forward_backward(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime, scale: float = 1.0
) -> torch.Tensor:
    """One micro-step: forward under the precision policy, backward of the scaled loss.

    Gradients add up across calls; scale = 1 / grad_accum makes their sum the mean.
    Returns the unscaled loss, detached.
    """
    with runtime.autocast():
        _, loss = model(x, y)
    (loss * scale).backward()
    return loss.detach()


def train(
    model: GPT,
    config: TrainConfig,
    stage: Stage,
    runtime: Runtime,
    max_iters: int,
    ckpt: dict | None = None,
    dist_info: Distributed | None = None,
) -> dict:
    """Train `model` for max_iters optimizer steps, resuming from `ckpt` if given.

    Returns the last evaluation's figures. Writes checkpoints, the log, plot and
    samples on the master process only.
    """
    dist_info = dist_info or Distributed()
    master = dist_info.is_master
    files = RunFiles(config.out)
    optimizer = configure_optimizer(model, config, runtime.device)
    start_step, tokens_seen, best_val = 0, 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, tokens_seen, best_val = ckpt["step"], ckpt["tokens_seen"], ckpt["best_val_loss"]
        set_rng_state(ckpt["rng"])
    if master and max_iters < config.warmup_iters:
        tqdm.write(f"warning: the run is {max_iters} steps, shorter than --warmup-iters {config.warmup_iters}: "
                   f"the learning rate never reaches --lr {config.lr:g}")
    if master:
        files.start(start_step if ckpt is not None else None)
        if ckpt is None and stage.sample_before_training:
            text = stage.sample(model, 0)
            files.append_sample(f"{stage.describe_step(0)} (before training)", text)
            tqdm.write(f"before training:\n{text}\n")

    raw_model = model
    compiled = config.compile and runtime.device.type in ("cpu", "cuda")  # inductor does not target MPS
    if compiled:
        model = torch.compile(model)
    device_ids = [dist_info.local_rank] if runtime.device.type == "cuda" else None
    if dist_info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=device_ids)

    def checkpoint(step: int) -> None:
        save_checkpoint(
            files.checkpoint,
            {
                **stage.checkpoint_extra,
                "model": raw_model.state_dict(),
                "model_config": asdict(raw_model.config),
                "optimizer": optimizer.state_dict(),
                "train_config": asdict(config),
                "step": step,
                "tokens_seen": tokens_seen,
                "best_val_loss": best_val,
                "max_iters": max_iters,
                "rng": rng_state(),
            },
        )

    def evaluate_and_save(step: int) -> dict:
        nonlocal best_val
        figures = stage.evaluate(raw_model)
        best_val = min(best_val, figures["val_loss"])
        text = stage.sample(raw_model, step)
        files.append_log({"step": step, "tokens": tokens_seen, **figures})
        files.append_sample(stage.describe_step(step), text)
        summary = "  ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float))
        tqdm.write(f"{stage.describe_step(step)}: {summary}\n{text}\n")
        checkpoint(step)
        files.write_plot(stage.plot_title)
        release_freed_memory()  # evaluation's eager activations would otherwise stay resident
        return figures

    figures: dict = {}
    step = start_step
    bar = tqdm(total=max_iters, initial=start_step, disable=not master, dynamic_ncols=True, unit="step")
    window_start, window_tokens = time.perf_counter(), 0
    with _StopFlag() as stop, contextlib.closing(bar):
        for step in range(start_step, max_iters):
            lr = lr_at(step, config, max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            loss_sum, step_tokens = 0.0, 0
            for micro in range(config.grad_accum):
                x, y = stage.get_batch(step, micro)
                # Under DDP, gradients are averaged across processes at each backward; during
                # accumulation only the last micro-step needs that.
                sync = dist_info.world_size == 1 or micro == config.grad_accum - 1
                try:
                    with contextlib.nullcontext() if sync else model.no_sync():
                        loss = forward_backward(model, x, y, runtime, 1 / config.grad_accum)
                except Exception as e:
                    # torch.compile needs a working C++/Triton toolchain, found only when the
                    # first step compiles. Without one, carry on uncompiled rather than fail.
                    if not (compiled and step == start_step and micro == 0):
                        raise
                    tqdm.write(f"warning: torch.compile failed ({type(e).__name__}); continuing without --compile")
                    compiled, model = False, raw_model
                    if dist_info.world_size > 1:
                        model = DistributedDataParallel(raw_model, device_ids=device_ids)
                    optimizer.zero_grad(set_to_none=True)
                    with contextlib.nullcontext() if sync else model.no_sync():
                        loss = forward_backward(model, x, y, runtime, 1 / config.grad_accum)
                loss_sum += loss
                step_tokens += x.numel() * dist_info.world_size
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += step_tokens
            window_tokens += step_tokens

            done = step + 1
            log_now = done % config.log_interval == 0
            eval_now = done % config.eval_interval == 0 or done == max_iters
            if log_now or eval_now or stop.requested or done == start_step + 1:
                train_loss = (loss_sum / config.grad_accum).item()
                if not math.isfinite(train_loss):
                    raise TrainingError(
                        f"step {done}: training loss is {train_loss}; stopping. The last good checkpoint "
                        f"({files.checkpoint}) is untouched: try a lower --lr or a higher --warmup-iters"
                    )
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                window_start, window_tokens = time.perf_counter(), 0
                bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                if master and log_now:
                    files.append_log({"step": done, "tokens": tokens_seen, "train_loss": train_loss, "lr": lr,
                                      "tokens_per_s": round(tokens_per_s)})
            bar.update(1)
            if dist_info.world_size > 1:
                # Every process must stop at the same step, or the others would wait forever.
                flag_tensor = torch.tensor([float(stop.requested)], device=runtime.device)
                dist.all_reduce(flag_tensor)
                stop.requested = bool(flag_tensor.item())
            if master and eval_now:
                figures = evaluate_and_save(done)
                window_start, window_tokens = time.perf_counter(), 0  # don't count eval time as training
            if stop.requested:
                if master and not eval_now:
                    checkpoint(done)
                    tqdm.write(f"saved {files.checkpoint} at step {done}; continue with --resume")
                break
    if dist_info.world_size > 1:
        dist.barrier()
    return figures

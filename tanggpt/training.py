"""The training loop every stage shares, and what it needs: flags, optimizer, schedule.

A stage (pretrain.py, finetune.py, align.py) supplies a Stage: how to draw a batch for a step,
how a batch becomes a loss (by default the model's causal-LM loss), how to evaluate
and what to sample. The loop does the rest, the same way for every stage: learning-rate
schedule, gradient accumulation, clipping, progress bar, periodic evaluation with a
checkpoint, the JSONL log and loss plot, Ctrl-C, exact resume and data parallelism.

The pieces it uses live in their own rooms: checkpoint.py (the checkpoint dict, RNG state),
run_files.py (log, plot, samples), distributed.py (torchrun), losses.py (the losses).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.errors import UserError
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.checkpoint import model_checkpoint, rng_state, save_checkpoint, set_rng_state
from tanggpt.cli import RunInterrupted, RuntimeConfig, flag, require_positive
from tanggpt.device import Runtime, compile_pays, release_freed_memory, setup_runtime
from tanggpt.distributed import Distributed, barrier, init_distributed, sum_over_processes
from tanggpt.losses import causal_lm_loss, labelled_tokens
from tanggpt.muon import MuonWithAdamW
from tanggpt.run_files import RunFiles


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers; the message says what to try."""


OPTIMIZER_HELP = "adamw for every parameter, or muon for the blocks' weight matrices (AdamW for the rest; tanggpt/muon.py)"


@dataclass
class TrainConfig(RuntimeConfig):
    """Flags every training stage has. A stage's config subclasses this one."""

    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    out: str = flag("ckpt.pt", "checkpoint path; the log, loss plot and samples are written beside it")
    resume: bool = flag(False, "continue the run saved at --out with the settings it was started with; a flag typed "
                               "now is applied with a note, except those that decide the run's batches or model "
                               "(--seed, --batch-size, --grad-accum, and the stage's own), which are refused")
    overwrite: bool = flag(False, "start a new run even though --out holds one: its checkpoint, log, plot and "
                                  "samples are replaced when the new run saves its first checkpoint (kept until "
                                  "then, and put back if it stops before; without the flag, such a run is refused)")
    compile: bool = flag(False, "torch.compile the model (faster steps after a slower start)")
    seed: int = flag(1337, "seed for initialisation, batches and samples")
    batch_size: int = flag(32, "sequences per micro-batch (per process under torchrun)")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(1e-3, "peak learning rate")
    min_lr: float = flag(1e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(100, "steps of linear warmup from 0 to --lr")
    weight_decay: float = flag(0.1, "AdamW weight decay, on weight matrices only")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = no clipping)")
    optimizer: str = flag("adamw", OPTIMIZER_HELP, choices=["adamw", "muon"])
    muon_lr_scale: float = flag(10.0, "with --optimizer muon: the Muon matrices' learning rate is --lr times this")
    eval_interval: int = flag(250, "evaluate, sample and checkpoint every this many steps")
    log_interval: int = flag(10, "write a train-loss record to the JSONL log every this many steps")

    def validate(self) -> None:
        require_positive(self, ("batch_size", "grad_accum", "eval_interval", "log_interval"))
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"--lr must be positive and --min-lr in [0, lr], got lr {self.lr}, min-lr {self.min_lr}")
        if self.warmup_iters < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("--warmup-iters, --grad-clip and --weight-decay must not be negative")
        if self.muon_lr_scale <= 0:
            raise UserError(f"--muon-lr-scale must be positive, got {self.muon_lr_scale}")


# What --resume never changes in any stage: they decide which batches each step draws and
# what the optimizer's saved state means. Each stage adds its own (its RESUME_FIXED).
LOOP_FIXED = {"seed", "batch_size", "grad_accum", "optimizer"}


# -----------------------------------------------------------------------------
# Optimizer, schedule, runtime


def configure_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with two groups: weight decay on matrices (>= 2 dims), none on biases and norms.

    Decay pulls weights toward zero; for matmul weights and embeddings that is useful
    regularisation, but for LayerNorm gains and biases it only fights their job.
    Frozen parameters (requires_grad False) never reach the optimizer.
    With --optimizer muon, the blocks' weight matrices take Muon steps instead (muon.py);
    the embeddings, the head, the gains and biases keep AdamW.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # With Muon, the blocks' matrices leave AdamW; LoRA's factors stay with it: Muon's fixed
    # step size is meant for full matrices.
    muon = {n for n, p in named if config.optimizer == "muon" and p.dim() == 2 and n.startswith("blocks.")
            and "lora_" not in n}
    groups = [
        {"params": [p for n, p in named if p.dim() >= 2 and n not in muon], "weight_decay": config.weight_decay},
        {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]
    if config.optimizer == "muon":
        groups.append({"params": [p for n, p in named if n in muon], "weight_decay": config.weight_decay,
                       "muon": True})
        return MuonWithAdamW([g for g in groups if g["params"]], lr=config.lr, lr_scale=config.muon_lr_scale)
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


# -----------------------------------------------------------------------------
# One optimizer step's gradients


class Stage(ABC):
    """What a training stage plugs into the loop: a subclass per stage (pretrain.py's
    PretrainStage, finetune.py's FinetuneStage, align.py's AlignStage) overrides these hooks.

    Every stage sets, in its __init__:
    kind, tokenizer: what every checkpoint of the stage records (checkpoint.model_checkpoint);
    plot_title: the loss plot's title.
    It may change the class defaults below (plot_ylabel, sample_before_training,
    evaluate_before_training, max_val_loss).
    """

    kind: str
    tokenizer: Tokenizer
    plot_title: str
    plot_ylabel: str = "loss (nats per token)"
    sample_before_training: bool = False  # also sample the untrained model, as a "before" picture
    evaluate_before_training: bool = False  # also log its figures at step 0, the baseline of every curve
    max_val_loss: float = math.inf  # a validation loss above this means the run diverged: nothing is saved

    @abstractmethod
    def get_batch(self, step: int, micro_step: int) -> Any:
        """A batch on the device. It must depend only on its arguments (and the rank), never
        on hidden state, so a resumed run sees exactly the batches an uninterrupted one would have."""

    @abstractmethod
    def evaluate(self, model: GPT) -> dict:
        """Figures to log, including "val_loss" (lower is better; above max_val_loss, e.g. far
        worse than a uniform guess, the run has diverged)."""

    @abstractmethod
    def sample(self, model: GPT, step: int) -> str:
        """Text to print and append to the samples file."""

    def pieces(self, step: int, micro_step: int) -> list:
        """The micro-batch as the loop runs it: by default get_batch's batch, whole. Since
        accumulate_gradients weights every batch by batch_weight, a stage may cut a micro-batch
        into pieces (finetune.py: rows of about one length together, less padding) and keep
        its gradient."""
        return [self.get_batch(step, micro_step)]

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The batch's mean loss: by default the causal-LM cross-entropy of (x, y)."""
        return causal_lm_loss(model, batch)

    def batch_weight(self, batch: Any) -> int:
        """How many units loss averages over (by default labelled tokens), so that micro-batches
        are weighted by what they carry (see accumulate_gradients)."""
        return labelled_tokens(batch)

    def batch_tokens(self, batch: Any) -> int:
        """Tokens the step processed, for tokens_seen and tokens/s."""
        return batch[0].numel()

    def describe_step(self, step: int) -> str:
        """A point in training as the samples file names it ("step 500", "epoch 2")."""
        return f"step {step}"

    def checkpoint_extra(self) -> dict:
        """The stage's own settings, stored in each checkpoint beside the model (the --init it tuned, ...)."""
        return {}


def step_model(model: torch.nn.Module, compile: bool, runtime: Runtime, dist_info: Distributed) -> torch.nn.Module:
    """The model as the training step runs it: compiled if asked, wrapped in
    DistributedDataParallel under torchrun. Both wrappers share the model's parameters,
    so the optimizer, evaluation and checkpoints use `model` itself."""
    if compile:
        model = torch.compile(model)
    if dist_info.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[dist_info.local_rank] if runtime.device.type == "cuda" else None)
    return model


def accumulate_gradients(model: torch.nn.Module, batches: list, stage: Stage, runtime: Runtime,
                         dist_info: Distributed, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Forward and backward each micro-batch of one step; return this process's mean loss, detached.

    Each micro-batch's loss is a mean over its own tokens (or pairs). Scaled by its share
    of all the step's tokens (every micro-batch of every process), the gradients add up to
    those of the mean over the whole step, exactly as one big batch would give. Scaling by
    1 / grad_accum instead would count a token of a short padded batch more than one of
    a long one.

    Under fp16 autocast, `scaler` multiplies each loss by its loss scale before backward, so
    that small gradients stay above fp16's smallest number (Trainer.step divides it out).
    """
    weights = [float(stage.batch_weight(batch)) for batch in batches]
    local_total = sum(weights)
    total = sum_over_processes(local_total, dist_info, runtime.device)
    mean_loss = torch.zeros((), device=runtime.device)
    for i, batch in enumerate(batches):
        # DDP averages gradients over processes at each backward (hence the world_size
        # factor below); during accumulation only the last micro-step needs to.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if dist_info.world_size == 1 or last else model.no_sync():
            with runtime.autocast():
                loss = stage.loss(model, batch)
            scaled = loss * (weights[i] * dist_info.world_size / total)
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        mean_loss += loss.detach() * (weights[i] / local_total)
    return mean_loss


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (what `kill`, schedulers and containers send) asks the loop
    to save and stop at the next step boundary; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step (Ctrl-C again to quit "
              "at once)", flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# The loop


class Trainer:
    """The loop, as a reader follows it: `run` takes steps; `step` is one optimizer step
    (the learning rate, the stage's batches, their gradients, clipping, the update);
    `report` logs the train loss; `evaluate_and_save` evaluates, samples and checkpoints.
    What differs between stages comes from the Stage's hooks (get_batch or pieces, loss, evaluate,
    sample), so nothing here knows what a poem is.

    Checkpoints, the log, plot and samples are written on the master process only.
    """

    def __init__(self, model: GPT, config: TrainConfig, stage: Stage, runtime: Runtime, max_iters: int,
                 ckpt: dict | None = None, dist_info: Distributed | None = None):
        self.model, self.config, self.stage, self.runtime, self.max_iters = model, config, stage, runtime, max_iters
        self.dist_info = dist_info or Distributed()
        self.master = self.dist_info.is_master
        self.files = RunFiles(config.out)
        self.optimizer = configure_optimizer(model, config, runtime.device)
        # fp16 autocast only (device.py); disabled, it passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.scales_loss)
        self.start_step, self.progress = 0, {"tokens_seen": 0, "best_val_loss": float("inf")}
        if ckpt is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.start_step, self.progress = ckpt["step"], {key: ckpt[key] for key in self.progress}
            set_rng_state(ckpt["rng"])
            if self.scaler.is_enabled() and "grad_scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.resumed = ckpt is not None
        self.saved_at = self.start_step if self.resumed else None  # the step of the checkpoint at --out, if any
        wanted = compile_pays(runtime) if config.compile is None else config.compile
        self.compiled = wanted and runtime.device.type in ("cpu", "cuda")  # inductor does not target MPS
        self.runner = step_model(model, self.compiled, runtime, self.dist_info)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=runtime.device)  # any step's loss so far
        self.window = {"start": time.perf_counter(), "tokens": 0, "steps": 0}  # throughput since the last report

    # -- the loop

    def run(self) -> dict:
        """Train to max_iters; return the last evaluation's figures. Raises RunInterrupted after
        saving when a signal stopped the run, and TrainingDiverged, saving nothing, when the
        loss or the weights blew up."""
        config, files = self.config, self.files
        if self.master and self.max_iters < config.warmup_iters:
            tqdm.write(f"warning: the run is {self.max_iters} steps, shorter than --warmup-iters "
                       f"{config.warmup_iters}: the learning rate never reaches --lr {config.lr:g}")
        if self.master:
            files.start(self.start_step if self.resumed else None, overwrite=config.overwrite)
        try:
            return self.train_steps()
        except BaseException:
            # Stopped before its first checkpoint (an error, a divergence, Ctrl-C while sampling):
            # a run this one was to replace (--overwrite) comes back (RunFiles).
            if self.master and self.saved_at is None and files.put_back():
                tqdm.write(f"note: put the previous run at {files.checkpoint} back; this run saved nothing")
            raise

    def train_steps(self) -> dict:
        config, stage, files = self.config, self.stage, self.files
        if self.master and not self.resumed and stage.sample_before_training:
            text = stage.sample(self.model, 0)
            files.append_sample(f"{stage.describe_step(0)} (before training)", text)
            tqdm.write(f"before training:\n{text}\n")
        if self.master and not self.resumed and stage.evaluate_before_training:
            before = stage.evaluate(self.model)
            files.append_log({"step": 0, "tokens": 0, **before})
            tqdm.write(f"before training: {summary(before)}")
        figures: dict = {}
        done = self.start_step
        bar = tqdm(total=self.max_iters, initial=self.start_step, disable=not self.master, dynamic_ncols=True,
                   unit="step")
        with StopFlag() as stop, contextlib.closing(bar):
            for step in range(self.start_step, self.max_iters):
                loss, lr = self.step(step)
                bar.update(1)
                done = step + 1
                eval_now = done % config.eval_interval == 0 or done == self.max_iters
                # Every process must stop at the same step, or the others would wait forever.
                if sum_over_processes(float(stop.requested), self.dist_info, self.runtime.device) and not stop.requested:
                    stop.signum = signal.SIGTERM
                if done % config.log_interval == 0 or eval_now or stop.requested or done == self.start_step + 1:
                    self.report(done, loss, lr, bar)
                if self.master and eval_now:
                    figures = self.evaluate_and_save(done)
                    self.window.update(start=time.perf_counter(), tokens=0, steps=0)  # eval time is not training
                if stop.requested:
                    break
        if stop.requested and not (done == self.max_iters and self.saved_at == done):  # a signal in the final save
            if self.master and self.saved_at != done:
                self.save(done)
            barrier(self.dist_info)
            raise RunInterrupted(f"saved {files.checkpoint} at step {done} of {self.max_iters}; continue with "
                                 f"--resume --out {files.checkpoint}", stop.signum)
        barrier(self.dist_info)
        return figures

    def step(self, step: int) -> tuple[torch.Tensor, float]:
        """One optimizer step: the scheduled learning rate, the stage's micro-batches, their
        gradients, clipping, the update. Returns this process's mean loss (detached) and the lr."""
        config = self.config
        lr = lr_at(step, config, self.max_iters)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.runner.train()
        batches = [piece for micro in range(config.grad_accum) for piece in self.stage.pieces(step, micro)]
        loss = self.gradients(step, batches)
        self.nonfinite |= ~torch.isfinite(loss)
        self.scaler.unscale_(self.optimizer)  # the true gradients, before clipping measures them
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        # With the scaler on: the update is skipped if a gradient overflowed, and the scale is
        # halved (or, after a long run without overflow, doubled). Off: optimizer.step().
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        step_tokens = sum(self.stage.batch_tokens(batch) for batch in batches) * self.dist_info.world_size
        self.progress["tokens_seen"] += step_tokens
        self.window["tokens"] += step_tokens
        self.window["steps"] += 1
        return loss, lr

    def gradients(self, step: int, batches: list) -> torch.Tensor:
        """accumulate_gradients through the step's model; if torch.compile fails on the first
        step (it needs a working C++/Triton toolchain, found only then), carry on uncompiled."""
        try:
            return accumulate_gradients(self.runner, batches, self.stage, self.runtime, self.dist_info, self.scaler)
        except Exception as e:
            if not (self.compiled and step == self.start_step):
                raise
            tqdm.write(f"warning: torch.compile failed ({type(e).__name__}); continuing without --compile")
            self.optimizer.zero_grad(set_to_none=True)
            self.compiled, self.runner = False, step_model(self.model, False, self.runtime, self.dist_info)
            return accumulate_gradients(self.runner, batches, self.stage, self.runtime, self.dist_info, self.scaler)

    def report(self, done: int, loss: torch.Tensor, lr: float, bar: tqdm) -> None:
        """The progress bar and, every --log-interval steps, a train-loss record. The loss is read
        (a device sync) only here, and a non-finite one at any step since stops the run."""
        if self.nonfinite.item():
            raise self.diverged(f"step {done}: training loss is {loss.item()}")
        seconds = max(time.perf_counter() - self.window["start"], 1e-9)
        tokens_per_s = self.window["tokens"] / seconds
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.master and done % self.config.log_interval == 0:
            self.files.append_log({"step": done, "tokens": self.progress["tokens_seen"], "train_loss": loss.item(),
                                   "lr": lr, "tokens_per_s": round(tokens_per_s),
                                   "seconds_per_step": round(seconds / self.window["steps"], 4)})
        self.window.update(start=time.perf_counter(), tokens=0, steps=0)

    # -- evaluation and checkpoints

    def evaluate_and_save(self, step: int) -> dict:
        stage, files = self.stage, self.files
        self.check_weights(step)  # before evaluating and sampling from them
        figures = stage.evaluate(self.model)
        if not math.isfinite(figures["val_loss"]) or figures["val_loss"] > stage.max_val_loss:
            raise self.diverged(f"step {step}: validation loss is {figures['val_loss']:.4g}")
        self.progress["best_val_loss"] = min(self.progress["best_val_loss"], figures["val_loss"])
        text = stage.sample(self.model, step)
        self.save(step)  # first: the log and the samples never run ahead of the checkpoint
        files.append_log({"step": step, "tokens": self.progress["tokens_seen"], **figures})
        files.append_sample(stage.describe_step(step), text)
        tqdm.write(f"{stage.describe_step(step)}: {summary(figures)}\n{text}\n")
        files.write_plot(stage.plot_title, stage.plot_ylabel)
        release_freed_memory()  # evaluation's eager activations would otherwise stay resident
        return figures

    def save(self, step: int) -> None:
        self.check_weights(step)
        save_checkpoint(self.files.checkpoint, model_checkpoint(
            self.stage.kind, self.model, self.stage.tokenizer, **self.stage.checkpoint_extra(),
            optimizer=self.optimizer.state_dict(), train_config=asdict(self.config), step=step, **self.progress,
            max_iters=self.max_iters, rng=rng_state(),
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {})))
        if self.saved_at is None:
            self.files.replaced()  # the run --overwrite replaces (if any) can go now
        self.saved_at = step

    def check_weights(self, step: int) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise self.diverged(f"step {step}: the weights are no longer finite numbers")

    def diverged(self, what: str) -> TrainingDiverged:
        kept = (f"the last good checkpoint ({self.files.checkpoint}, step {self.saved_at}) is untouched"
                if self.saved_at is not None else "no checkpoint was written")
        return TrainingDiverged(f"{what}; stopping, {kept}. Try a lower --lr or a higher --warmup-iters")


def summary(figures: dict) -> str:
    """An evaluation's figures on one line, as the loop prints them."""
    return "  ".join(f"{k} {v:.4f}" for k, v in figures.items() if isinstance(v, float))


def train(model: GPT, config: TrainConfig, stage: Stage, runtime: Runtime, max_iters: int,
          ckpt: dict | None = None, dist_info: Distributed | None = None) -> dict:
    """Train `model` for max_iters optimizer steps, resuming from `ckpt` if given; return the
    last evaluation's figures (see Trainer)."""
    return Trainer(model, config, stage, runtime, max_iters, ckpt, dist_info).run()


def finished(ckpt: dict | None, max_iters: int, out: str, further: str, master: bool = True) -> bool:
    """A resumed run already at its last step: say so, and what to give to train it `further`."""
    if ckpt is None or ckpt["step"] < max_iters:
        return False
    if master:
        print(f"nothing to do: the run at {out} finished at step {ckpt['step']:,} of {max_iters:,}; give {further} "
              "to train it further")
    return True

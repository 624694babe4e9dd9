"""Checkpoints: plain data written atomically, loaded without running any pickled code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts:

    kind          "pretrain", "sft" or "dpo": which stage wrote it (see KINDS)
    model         the state dict;  model_config: GPTConfig as a dict
    tokenizer     Tokenizer.to_dict(), so the exact tokenizer travels with the weights
    optimizer, step, tokens_seen, best_val_loss, max_iters, rng, train_config
                  what a run needs to resume exactly (training.py writes them)

Everything is loaded with torch.load(weights_only=True), which refuses to build
arbitrary objects, so a checkpoint from a stranger cannot run code on your machine.
"""

from __future__ import annotations

import hashlib
import os
import random
import textwrap
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from cli import UserError
from data.tokenizer import Tokenizer, tokenizer_from_dict
from model import GPT, GPTConfig

# What each stage's checkpoint is, in words. "sft" and "dpo" models answer the instruction
# prompt and stop; a "pretrain" model only continues text.
KINDS = {"pretrain": "pretrained", "sft": "instruction-tuned", "dpo": "preference-tuned"}
CHECKPOINT_KEYS = ("kind", "model", "model_config", "tokenizer")
RESUME_KEYS = ("optimizer", "step", "tokens_seen", "best_val_loss", "max_iters", "rng", "train_config")


class CheckpointError(UserError):
    """A missing, unreadable or foreign checkpoint; the message names the flag and the file."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(file) on a temporary file beside `path`, flush it to disk, then rename it over `path`.

    A rename within one folder is atomic: a crash mid-write leaves the previous file
    intact and at worst a stray temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path, flag_name: str = "--resume", resume: bool = False) -> dict:
    """Load a checkpoint with weights_only=True, or raise one clear line saying what is wrong.
    With resume, it must also hold the training state a run continues from."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{flag_name}: no checkpoint at {path}")
    if path.is_dir():
        raise CheckpointError(f"{flag_name}: {path} is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a text file, a pickle of objects: all unusable
        reason = textwrap.shorten(str(e).strip().splitlines()[0], 160, placeholder=" …") if str(e).strip() \
            else type(e).__name__
        raise CheckpointError(f"{flag_name}: {path} is not a readable checkpoint (truncated or not one): {reason}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{flag_name}: {path} is not a checkpoint of this project (missing model or tokenizer)")
    missing = [k for k in RESUME_KEYS if k not in ckpt] if resume else []
    if missing:
        raise CheckpointError(f"{flag_name}: {path} holds a model but not the training state a run resumes from "
                              f"(no {', '.join(missing)}); start a new run from it instead")
    return ckpt


def answers_prompts(kind: str) -> bool:
    """Whether a checkpoint of this kind was tuned to answer the instruction prompt and stop."""
    return kind in ("sft", "dpo")


def model_and_tokenizer(ckpt: dict) -> tuple[GPT, Tokenizer]:
    """The model (on the CPU, fp32) and the tokenizer stored in a loaded checkpoint."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, tokenizer_from_dict(ckpt["tokenizer"])


def load_model(path: str | Path, flag_name: str = "--ckpt") -> tuple[GPT, Tokenizer, str]:
    """A checkpoint file -> its model (CPU, fp32, train mode), its tokenizer and its kind."""
    ckpt = load_checkpoint(path, flag_name)
    model, tokenizer = model_and_tokenizer(ckpt)
    return model, tokenizer, ckpt["kind"]


def model_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of a model's weights: the same weights give the same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rng_state() -> dict:
    """Every random number generator training draws from, as plain tensors and tuples."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""Checkpoints: plain data written atomically, loaded without running any pickled code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts:

    kind          PRETRAIN, SFT, DPO or RL ("pretrain", "sft", "dpo", "rl"): which stage wrote it
    model         the state dict;  model_config: GPTConfig as a dict
    tokenizer     Tokenizer.to_dict(), so the exact tokenizer travels with the weights
    optimizer, step, tokens_seen, best_val_loss, max_iters, rng, train_config
                  what a run needs to resume exactly (training.py writes them)
    lora          only in an adapter checkpoint (a run with --lora-rank): the adapters'
                  rank, alpha, targets and dropout, the path of the base checkpoint and
                  the fingerprint of its weights. "model" then holds the adapters alone;
                  model_and_tokenizer puts them back on their base.

Everything is loaded with torch.load(weights_only=True), which refuses to build
arbitrary objects, so a checkpoint from a stranger cannot run code on your machine.
"""

from __future__ import annotations

import hashlib
import json
import random
import textwrap
from dataclasses import asdict, fields
from pathlib import Path

import torch

from data.errors import UserError
from data.tokenizer import Tokenizer, tokenizer_from_dict
from model import GPT, GPT2_BLOCK, GPTConfig
from tanggpt.atomic import atomic_write
from tanggpt.lora import adapter_layers, adapter_state_dict, add_adapters, load_adapter_state_dict, merge_adapters

# Which stage wrote a checkpoint, and what that makes it, in words. SFT and DPO models
# answer the instruction prompt and stop; a PRETRAIN model only continues text.
PRETRAIN, SFT, DPO, RL = "pretrain", "sft", "dpo", "rl"
KINDS = {PRETRAIN: "pretrained", SFT: "instruction-tuned", DPO: "preference-tuned", RL: "reinforcement-tuned"}
CHECKPOINT_KEYS = ("kind", "model", "model_config", "tokenizer")
LORA_KEYS = ("rank", "alpha", "targets", "dropout", "base", "base_fingerprint")
RESUME_KEYS = ("optimizer", "step", "tokens_seen", "best_val_loss", "max_iters", "rng", "train_config")


class CheckpointError(UserError):
    """A missing, unreadable or foreign checkpoint; the message names the flag and the file."""


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """torch.save, atomically (atomic.atomic_write)."""
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
        reason = first_line(e)
        raise CheckpointError(f"{flag_name}: {path} is not a readable checkpoint (truncated or not one): {reason}") from None
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{flag_name}: {path} is not a checkpoint of this project (missing model or tokenizer)")
    if not isinstance(ckpt["kind"], str) or ckpt["kind"] not in KINDS:
        raise CheckpointError(f"{flag_name} {path}: unknown checkpoint kind {ckpt['kind']!r} (expected one of "
                              f"{', '.join(KINDS)})")
    missing = [k for k in RESUME_KEYS if k not in ckpt] if resume else []
    if missing:
        raise CheckpointError(f"{flag_name}: {path} holds a model but not the training state a run resumes from "
                              f"(no {', '.join(missing)}); start a new run from it instead")
    return ckpt


def resume_checkpoint(out: str | Path, kind: str) -> dict:
    """The run at --out that --resume continues: a checkpoint with its training state, written by the `kind` stage."""
    ckpt = load_checkpoint(out, "--resume", resume=True)
    if ckpt["kind"] != kind:
        raise CheckpointError(f"--resume: {out} is a {ckpt['kind']} checkpoint ({KINDS.get(ckpt['kind'], 'unknown')}), "
                              f"not a {kind} run ({KINDS[kind]}) to continue")
    return ckpt


def input_fingerprint(value: object) -> str:
    """A short hash of what a run reads (the corpus's poems, --data's records, a tokenizer),
    given as plain JSON data: the same content gives the same fingerprint."""
    # ensure_ascii: a lone surrogate in the text is hashed as its escape, never an encoding error
    return hashlib.sha256(json.dumps(value, ensure_ascii=True, sort_keys=True).encode()).hexdigest()[:16]


def check_same_inputs(ckpt: dict | None, inputs: dict[str, str], out: str | Path) -> None:
    """A resumed run trains on what it started on. `inputs` maps each flag whose content decides
    the run's samples to its fingerprint now (--poems: data.corpus.corpus_fingerprint; --data:
    input_fingerprint of its records); the checkpoint holds them as the run started (under
    "inputs"; a run from before they were recorded is not checked)."""
    saved = (ckpt or {}).get("inputs", {})
    for name, now in inputs.items():
        if name in saved and saved[name] != now:
            raise CheckpointError(f"--resume: the content of {name} changed since the run at {out} started "
                                  f"(fingerprint {saved[name]} then, {now} now), so it would go on with other "
                                  "samples; restore it, or start a new run with another --out")


def tuned_format(ckpt: dict) -> str:
    """The format a checkpoint answers requests in: "chat" for a model finetune.py tuned on
    conversations (--format chat), else "instruct" (<INS>...<INP>...<RES>)."""
    return ckpt.get("format", "instruct")


def refuse_chat_model(ckpt: dict, flag: str, path: str | Path, command: str) -> None:
    """One line, before any work, for a chat model given to a command that asks in the
    instruction format (its prompts would be a format the model was never tuned on)."""
    if tuned_format(ckpt) == "chat":
        raise UserError(f"{flag} {path} was tuned on conversations (finetune.py --format chat), and {command} asks "
                        "in the instruction format: give a model tuned without --format chat, or talk to this one "
                        "with sample.py")


def answers_prompts(kind: str) -> bool:
    """Whether a checkpoint of this kind was tuned to answer the instruction prompt and stop."""
    return kind in (SFT, DPO, RL)


def model_checkpoint(kind: str, model: torch.nn.Module, tokenizer: Tokenizer, **extra) -> dict:
    """The dict every checkpoint is (see the module doc): which stage wrote it, the weights
    (model_state), the model's config and the tokenizer, and what the writer adds (the
    training loop: its resume state; a stage: its settings; tools/merge_lora.py: where
    the merged adapters came from)."""
    return {"kind": kind, "tokenizer": tokenizer.to_dict(), "model": model_state(model),
            "model_config": asdict(model.config), **extra}


def model_and_tokenizer(ckpt: dict, path: str | Path = "", base: str = "", merge: bool = True,
                        flag_name: str = "--ckpt", base_flag: str = "--base") -> tuple[GPT, Tokenizer]:
    """The model (on the CPU, fp32) and the tokenizer stored in a loaded checkpoint.

    An adapter checkpoint (read from `path`) is put back on its base checkpoint: `base` if
    given (the script's `base_flag`; "" where it has none), else the recorded path, else a
    file of the same name beside `path` (the two moved together); its weights must have the
    fingerprint the adapters recorded. With merge, the adapters are folded into the weights:
    an ordinary model, as fast as the base; without, they stay apart and trainable (a LoRA
    run resuming).
    """
    where = f"{flag_name} {path}".strip()
    if base and "lora" not in ckpt:  # a base says where adapters' frozen weights are: here it would do nothing
        raise CheckpointError(f"{base_flag} {base}: {where} holds no LoRA adapters, so it has no base to give; "
                              f"drop {base_flag}")
    if "lora" not in ckpt:
        model = build_model(ckpt, where)
        tokenizer = read_tokenizer(ckpt, where)
        if tokenizer.vocab_size != model.config.vocab_size:
            raise CheckpointError(f"{where}: its tokenizer has {tokenizer.vocab_size:,} ids and its model "
                                  f"{model.config.vocab_size:,}: the two do not belong together")
        return model, tokenizer
    spec = ckpt["lora"]
    missing = [k for k in LORA_KEYS if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise CheckpointError(f"{where}: its LoRA record lacks {', '.join(missing)}; not an adapter checkpoint "
                              "this version reads")
    model, tokenizer = base_model(spec, path, base, flag_name, base_flag)
    try:
        add_adapters(model, spec["rank"], spec["alpha"], spec["targets"], spec["dropout"], spec.get("token_ids", []))
        load_adapter_state_dict(model, ckpt["model"])
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{where}: its adapters do not fit their base ({first_line(e)})") from None
    return (merge_adapters(model) if merge else model), tokenizer


def build_model(ckpt: dict, where: str) -> GPT:
    """The GPT a (non-adapter) checkpoint describes, with its weights; a model_config this
    version cannot build, or weights that do not fit it, are one line naming `where`."""
    config = ckpt["model_config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: its model_config is not a record of settings")
    unknown = sorted(set(config) - {f.name for f in fields(GPTConfig)})
    if unknown:
        raise CheckpointError(f"{where}: its model_config has settings this version does not know "
                              f"({', '.join(map(str, unknown))}): written by a newer version of this project?")
    try:
        # Fields a checkpoint lacks are choices made after it was written: it used GPT-2's.
        model = GPT(GPTConfig(**{**GPT2_BLOCK, **config}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: its model_config describes no model this code builds ({first_line(e)})") \
            from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: its weights do not match its model_config ({first_line(e)})") from None
    return model


def read_tokenizer(ckpt: dict, where: str) -> Tokenizer:
    """The tokenizer a checkpoint stores, or one line naming `where`."""
    try:
        return tokenizer_from_dict(ckpt["tokenizer"])
    except Exception as e:  # a record of another version: a KeyError, a TypeError, an unknown encoding...
        raise CheckpointError(f"{where}: its tokenizer is not one this version reads ({first_line(e)})") from None


def first_line(error: BaseException) -> str:
    """An exception's message cut to one meaningful line (load_state_dict's starts with a header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(error).__name__
    return textwrap.shorten(line, 160, placeholder=" …")


def base_model(spec: dict, path: str | Path, base: str, flag_name: str, base_flag: str) -> tuple[GPT, Tokenizer]:
    """The base an adapter checkpoint was trained on (see model_and_tokenizer), checked by its fingerprint."""
    recorded = Path(spec["base"])
    fix = f"give the checkpoint they were trained on with {base_flag} PATH" if base_flag else \
        f"put the checkpoint they were trained on back at {recorded}"
    candidates = [Path(base)] if base else [recorded, Path(path).parent / recorded.name]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        where = (f"{base_flag} {base} is a folder, not a checkpoint file" if Path(base).is_dir() else
                 f"{base_flag} {base} does not exist") if base else f"its base checkpoint {recorded} is not there (moved?)"
        raise CheckpointError(f"{flag_name} {path} holds LoRA adapters, and {where}; {fix}")
    base_name = base_flag or "the base checkpoint"
    model, tokenizer = model_and_tokenizer(load_checkpoint(found, base_name), found, flag_name=base_name)
    fingerprint = model_fingerprint(model.state_dict())
    if fingerprint != spec["base_fingerprint"]:
        raise CheckpointError(f"{flag_name} {path}: its adapters were trained on other weights than {found}'s "
                              f"(fingerprint {spec['base_fingerprint']}, this one {fingerprint}); {fix}")
    return model, tokenizer


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a model: its weights; for a model with LoRA adapters, the
    adapters alone (the frozen rest is the base checkpoint's, recorded beside them)."""
    return adapter_state_dict(model) if adapter_layers(model) else model.state_dict()


def load_model(path: str | Path, flag_name: str = "--ckpt", base: str = "") -> tuple[GPT, Tokenizer, str]:
    """A checkpoint file -> its model (CPU, fp32, train mode, adapters merged), its tokenizer and its kind."""
    ckpt = load_checkpoint(path, flag_name)
    model, tokenizer = model_and_tokenizer(ckpt, path, base, flag_name=flag_name)
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

"""What the stages that tune a checkpoint share (finetune.py, align.py): their common flags,
and starting a run from --init or continuing one with --resume.

Both stages start from a checkpoint another stage wrote, count their length in epochs
(optionally cut by --max-iters), evaluate once per epoch unless told otherwise, and show
a gallery of poems for a few titles at each evaluation. Both tune every weight, or with
--lora-rank only low-rank adapters on the frozen model (lora.py), saving the adapters alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from data.corpus import DEFAULT_POEMS_DIR
from data.errors import UserError
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.checkpoint import (PRETRAIN, answers_prompts, load_checkpoint, model_and_tokenizer, model_fingerprint,
                                resume_checkpoint)
from tanggpt.cli import flag, flag_name, require_positive, restore_run_flags
from tanggpt.lora import TARGETS, add_adapters, trainable_parameters
from tanggpt.run_files import RunFiles, refuse_inputs_as_outputs
from tanggpt.training import TrainConfig, finished

# What a finished tuning run needs to be trained further (training.finished says it).
MORE_EPOCHS = "more --epochs (or a larger --max-iters)"
# The LoRA flags decide which model a run trains: a resumed run keeps them.
LORA_FIXED = {"lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "lora_tokens"}


@dataclass
class TuneConfig(TrainConfig):
    init: str = flag("", "the checkpoint to tune; not needed with --resume")
    epochs: int = flag(2, "passes over the training samples")
    max_iters: int = flag(0, "stop after this many steps (0 = run all --epochs); the schedule ends there")
    eval_interval: int = flag(0, "evaluate, sample and checkpoint every this many steps (0 = once per epoch)")
    sample_titles: str = flag("", "comma-separated titles to write poems for at each evaluation "
                                  "(default: 春夜喜雨 and three finetune-val titles)")
    sample_tokens: int = flag(200, "length limit of each sampled poem, in tokens")
    lora_rank: int = flag(0, "tune low-rank adapters of this rank on the frozen model instead of every weight "
                             "(LoRA, lora.py); checkpoints then hold the adapters alone. 0 = full tuning")
    lora_alpha: float = flag(16.0, "LoRA's scale: the adapters' update B A is multiplied by alpha / rank")
    lora_targets: str = flag("all", "the linear layers that get adapters: attention (qkv and output projections), "
                                    "mlp (both layers) or all", choices=list(TARGETS))
    lora_dropout: float = flag(0.0, "dropout on the adapters' input during training")
    lora_tokens: str = flag("specials", "with --lora-rank, also train the embedding rows of the special tokens "
                                        "(<INS>, <INP>, <RES>, <|endoftext|>, <unk>: never seen in pretraining), "
                                        "or none", choices=["specials", "none"])

    def validate(self) -> None:
        require_positive(self, ("epochs", "sample_tokens"))
        if self.lora_rank < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-rank must not be negative (0 = full tuning), --lora-alpha must be positive and "
                            f"--lora-dropout in [0, 1), got {self.lora_rank}, {self.lora_alpha:g}, "
                            f"{self.lora_dropout:g}")
        for name in ("eval_interval", "max_iters"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag_name(name)} must not be negative, got {getattr(self, name)}")
        # The shared checks, where --eval-interval 0 means "once per epoch", a positive number.
        TrainConfig.validate(replace(self, eval_interval=self.eval_interval or 1))

    def gallery_titles(self, defaults: list[str]) -> list[str]:
        """--sample-titles, or 春夜喜雨 and the given titles."""
        return [t.strip() for t in self.sample_titles.split(",") if t.strip()] or ["春夜喜雨"] + defaults

    def fill_defaults(self) -> None:
        """Settle the defaults that depend on other flags, before any check (a stage that has
        such defaults overrides this: finetune.py's learning rate follows --tasks)."""

    def settle_schedule(self, steps_per_epoch: int) -> int:
        """Fix the run's length, --epochs cut by --max-iters, and return it; for --eval-interval 0
        set it to once per epoch."""
        max_iters = self.epochs * steps_per_epoch
        if self.max_iters:
            max_iters = min(max_iters, self.max_iters)
        if self.eval_interval == 0:
            self.eval_interval = min(steps_per_epoch, max_iters)
        return max_iters


def open_run(config: TuneConfig, explicit: set[str], kind: str, fixed: set[str], init_example: str,
             before_the_flag: dict | None = None, inputs: dict[str, str] | None = None,
             outputs: dict[str, Path] | None = None) -> tuple[dict | None, dict, list[str]]:
    """Check the flags and --out before any work; return (the checkpoint to resume or None,
    the checkpoint to start from, notes to print).

    With --resume, the run at --out must be a `kind` run, and continues with its own
    settings (cli.restore_run_flags; `fixed` are the flags it never changes, `before_the_flag`
    the values of flags its checkpoint does not record). No file the run writes (--out and
    the files beside it, and the stage's own `outputs`) may be one it reads (--init, the
    base of --init's adapters, the corpus, the stage's own `inputs`).
    """
    ckpt, notes = None, []
    if config.resume:  # the run's own settings first, then check them like any others
        ckpt = resume_checkpoint(config.out, kind)
        notes += restore_run_flags(config, explicit, ckpt["train_config"], fixed, config.out, before_the_flag)
    config.fill_defaults()
    config.validate()
    unused = sorted(name for name in explicit & LORA_FIXED if name != "lora_rank") if not config.lora_rank else []
    if unused:
        notes.append(f"note: {', '.join(flag_name(n) for n in unused)} only apply with --lora-rank R; this run "
                     "tunes every weight")
    if not config.resume and not config.init:
        raise UserError(f"--init: give the checkpoint to tune, e.g. --init {init_example}")
    files = RunFiles(config.out)
    written = {**files.outputs(), **(outputs or {})}
    read = {"--init": config.init} if not config.resume else {}
    refuse_inputs_as_outputs(written, {**read, **(inputs or {})}, config.poems or DEFAULT_POEMS_DIR)
    source = ckpt if ckpt is not None else load_checkpoint(config.init, "--init")
    if "lora" in source:  # adapters are read with their base
        base = Path(source["lora"]["base"])
        refuse_inputs_as_outputs(written, {"the base of the adapters in " + ("--out" if config.resume else "--init"):
                                           base})
    notes += files.prepare(config.resume, config.overwrite)
    return ckpt, source, notes


def refuse_pretrained(config: TuneConfig, ckpt: dict | None, source: dict, why: str, then: str) -> None:
    """A new run of a stage that asks the model questions (align.py, rl.py) cannot start from a
    pretrained checkpoint: it continues text, never answers the instruction prompt or stops.
    `why` says what that costs the stage, `then` what to do with the tuned model."""
    if ckpt is None and source["kind"] == PRETRAIN:
        raise UserError(f"--init {config.init} is a pretrained checkpoint: it continues text but does not answer "
                        f"the instruction prompt or stop, so {why}. Tune it first (python finetune.py --init "
                        f"{config.init}), then {then}: --init ckpt_sft.pt")


def fingerprint_of_init(ckpt: dict | None, model: GPT, adapters: dict) -> str:
    """The fingerprint of the --init weights a run started from (model_to_tune's model and
    adapters): recorded in a resumed run's checkpoint, the base's for a LoRA run, else the
    model's own, taken before its first step."""
    if ckpt is not None:
        return ckpt["init_fingerprint"]
    return adapters["lora"]["base_fingerprint"] if adapters else model_fingerprint(model.state_dict())


def done_as_started(ckpt: dict, explicit: set[str], out: str, master: bool = True) -> bool:
    """A resumed run that finished the length it was started with and is given no new length
    (--epochs, --max-iters): say there is nothing to do before any data is read again (the
    full check, training.finished, needs the data to count a new length in steps)."""
    return not explicit & {"epochs", "max_iters"} and finished(ckpt, ckpt["max_iters"], out, MORE_EPOCHS, master)


def model_to_tune(config: TuneConfig, ckpt: dict | None, source: dict, chat_markers: bool = False
                  ) -> tuple[GPT, Tokenizer, dict]:
    """The model a run is about to train (not yet tuned: --init's weights, or the resumed
    run's) and its tokenizer, plus what its checkpoints store beside the weights about
    adapters ({"lora": ...}, or {} for full tuning).

    With chat_markers (finetune.py --format chat) a tokenizer without the chat template's
    markers gains them, and the model rows for them (GPT.grow_vocab), before any adapter is
    added: with --lora-tokens specials their rows are among those that train.

    A new run starts from --init (an adapter checkpoint as --init is merged first: its
    tuned weights are the new base); with --lora-rank the model is frozen and adapters are
    added, and the base's path and fingerprint are recorded so the adapters can find it
    again. A resumed LoRA run puts its saved adapters back on that base, unmerged.
    """
    if ckpt is not None:
        model, tokenizer = model_and_tokenizer(ckpt, config.out, merge=False, flag_name="--resume", base_flag="")
        return model, tokenizer, {"lora": ckpt["lora"]} if "lora" in ckpt else {}
    model, tokenizer = model_and_tokenizer(source, config.init, flag_name="--init", base_flag="")
    if chat_markers:
        tokenizer = tokenizer.with_chat_markers()
        model.grow_vocab(tokenizer.vocab_size)
    if not config.lora_rank:
        return model, tokenizer, {}
    token_ids = sorted(tokenizer.special_ids.values()) if config.lora_tokens == "specials" else []
    spec = {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": config.lora_targets,
            "dropout": config.lora_dropout, "token_ids": token_ids, "base": str(Path(config.init).resolve()),
            "base_fingerprint": model_fingerprint(model.state_dict())}
    try:
        add_adapters(model, config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_dropout, token_ids)
    except ValueError as e:  # a model the adapters cannot fit (the flags themselves are checked before)
        raise UserError(f"--init {config.init}: {e}") from None
    return model, tokenizer, {"lora": spec}


def read_init_again(config: TuneConfig, init_fingerprint: str, purpose: str) -> GPT:
    """The --init model read again, for a resumed full run that needs it as it was (a frozen
    reference: align's pairs, rl's KL), checked to be the one the run started from (its
    fingerprint). `purpose` completes "read again to ..." in the messages."""
    flag = f"--init (read again to {purpose})"
    init = load_checkpoint(config.init, flag)
    model = model_and_tokenizer(init, config.init, flag_name=flag, base_flag="")[0] \
        if answers_prompts(init["kind"]) else None
    if model is None or model_fingerprint(model.state_dict()) != init_fingerprint:
        raise UserError(f"--init {config.init} is no longer the checkpoint this run started from, and the run needs "
                        f"that one to {purpose}: restore it, or start anew")
    return model


def describe_tuning(model: GPT, extra: dict) -> str:
    """"full tuning: every weight trains", or the adapters' rank and size against the model's."""
    if "lora" not in extra:
        return "full tuning: every weight trains"
    spec = extra["lora"]
    trainable, total = trainable_parameters(model)
    frozen = total - trainable
    rows = f" and {len(spec['token_ids'])} token rows" if spec.get("token_ids") else ""
    return (f"LoRA rank {spec['rank']} on {spec['targets']} linear layers{rows} (alpha {spec['alpha']:g}): "
            f"{trainable:,} trainable parameters ({trainable / frozen:.2%} of the model's {frozen:,}, all frozen)")

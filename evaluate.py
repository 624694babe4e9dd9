"""Measure what instruction tuning changed: losses, poems for unseen titles, use of the title.

    python evaluate.py --ckpt ckpt_sft.pt --compare ckpt.pt     # tuned vs base, side by side
    python evaluate.py --ckpt ckpt_sft.pt --eval-poems my_poems/ --json
    python evaluate.py --ckpt ckpt_sft_lora.pt --compare ckpt_sft.pt   # LoRA adapters vs full tuning
    python evaluate.py --ckpt a/lora.pt --base a/ckpt.pt --compare b/lora.pt --compare-base b/ckpt.pt

One column per checkpoint, each figure described in tanggpt/evaluation.py: losses, poems
for unseen titles (stop, form, diversity, memorisation, rhyme and tones), the title gain and,
for a tuned checkpoint, instruction following and the rule rewards of its answers
(tanggpt/rewards.py). A chat model (finetune.py --format chat) is asked every request as a
turn of a conversation, and then in conversations: follow-ups and system prompts, beside a
single-turn model's figures for the same tasks (tanggpt/conversation_evaluation.py):

    python evaluate.py --ckpt ckpt_chat.pt --compare ckpt_sft.pt
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from data.corpus import DEFAULT_POEMS_DIR, clean_poems, load_corpus, load_poems
from data.errors import UserError
from tanggpt.checkpoint import answers_prompts, tuned_format
from tanggpt.conversation_evaluation import format_conversation_table
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.device import setup_runtime
from tanggpt.evaluation import (EvaluationConfig, check_measurable, evaluate_checkpoint, format_instruction_table,
                                format_table, title_fits)
from tanggpt.generation import load_for_sampling
from tanggpt.prosody import prosody_figures


@dataclass
class EvaluateConfig(EvaluationConfig):
    ckpt: str = flag("ckpt_sft.pt", "checkpoint to evaluate")
    compare: str = flag("", "a second checkpoint, evaluated the same way in a second column (e.g. ckpt.pt)")
    base: str = flag("", "when --ckpt is an adapter checkpoint (a --lora-rank run): its base checkpoint, when it is "
                         "no longer at the path the adapters recorded")
    compare_base: str = flag("", "the same for the --compare checkpoint")
    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    eval_poems: str = flag("", "folder of poem JSON files (the same schema): write poems for the titles of every "
                               "poem in it, all treated as unseen, instead of finetune-val titles")
    json: bool = flag(False, "print the figures as one JSON object instead of the table")


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, EvaluateConfig, argv, __doc__.splitlines()[0])


def check_flags(config: EvaluateConfig, explicit: set[str]) -> None:
    """What the flags mean together, refused before anything is loaded."""
    config.validate()
    require_positive(config, ("num_titles", "batch_size"))
    if config.task_prompts < 0:
        raise UserError(f"--task-prompts must not be negative (0 = skip), got {config.task_prompts}")
    for name in ("ckpt", "compare", "base", "compare_base", "poems", "eval_poems"):
        if name in explicit and not getattr(config, name).strip():  # typed but empty: an unfinished command line
            raise UserError(f"--{name.replace('_', '-')} is empty")
    if config.compare_base and not config.compare:
        raise UserError("--compare-base is the base of the --compare checkpoint; give --compare too")
    if config.compare and same_file(config.ckpt, config.compare):
        raise UserError(f"--compare {config.compare} is the --ckpt checkpoint itself; compare it with another one")
    if config.eval_poems and same_file(config.eval_poems, config.poems or DEFAULT_POEMS_DIR):
        raise UserError(f"--eval-poems {config.eval_poems} is the --poems folder itself: its poems are the ones the "
                        "model was trained on, not unseen ones; give a folder of other poems")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one existing file or folder (however each is spelled)."""
    try:
        return Path(a).samefile(b)
    except OSError:  # one of them is not there: its own check says so
        return False


def run(config: EvaluateConfig, explicit: set[str]) -> dict:
    check_flags(config, explicit)
    runtime = setup_runtime(config.device, config.dtype)
    # Both checkpoints first (an adapter checkpoint with its base), and what --rhyme needs of
    # each tokenizer: a bad --compare should fail now, not after the first column.
    loaded = {}  # path -> (its flag, checkpoint, model, tokenizer, the sampler's constraint)
    for path, flag_name, base, base_flag in ((config.ckpt, "--ckpt", config.base, "--base"),
                                             (config.compare, "--compare", config.compare_base, "--compare-base")):
        if path:
            ckpt, model, tokenizer = load_for_sampling(path, flag_name, base, base_flag)
            try:
                allowed = config.constraint(tokenizer)
            except UserError as e:
                raise UserError(f"{flag_name} {path}: {e}") from None
            loaded[path] = (flag_name, ckpt, model, tokenizer, allowed)
    if "task_prompts" in explicit and config.task_prompts \
            and not any(answers_prompts(ckpt["kind"]) for _, ckpt, *_ in loaded.values()):
        print("note: --task-prompts: no checkpoint here is tuned to answer instructions, so none is asked",
              file=sys.stderr)
    if config.eval_poems:  # read before the corpus, so a bad folder fails at once
        title_poems = clean_poems(load_poems(config.eval_poems, "--eval-poems"))[0]
        if not title_poems:
            raise UserError(f"--eval-poems {config.eval_poems}: no poems left after cleaning")
        if "num_titles" in explicit:  # typed: the first N of the folder; else every poem in it
            title_poems = title_poems[: config.num_titles]
    splits = load_corpus(config.poems or None, verbose=False)
    if config.eval_poems:
        source = f"the first {len(title_poems)} poems of {config.eval_poems}" if "num_titles" in explicit \
            else f"every poem of {config.eval_poems}"
    else:
        title_poems, source = splits["finetune_val"][: config.num_titles], "finetune-val"
    for path, (flag_name, _, model, tokenizer, _) in loaded.items():  # before any figure: each model can be measured
        check_measurable(model, tokenizer, splits, f"{flag_name} {path}")
    # A title whose prompt does not fit a model's block would lose its instruction to the crop:
    # such titles are left out of every column (the columns answer the same titles).
    fit = [all(title_fits(tokenizer, p.title, model.config.block_size, chat=tuned_format(ckpt) == "chat")
               for _, ckpt, model, tokenizer, _ in loaded.values()) for p in title_poems]
    kept = [p for p, fits in zip(title_poems, fit) if fits]
    if len(kept) < len(title_poems):
        longest = max((p.title for p, fits in zip(title_poems, fit) if not fits), key=len)
        where = f"--eval-poems {config.eval_poems}" if config.eval_poems else "finetune-val"
        if not kept:
            raise UserError(f"{where}: no title's prompt fits the block_size of every checkpoint (the longest: "
                            f"{longest!r}); give shorter titles or a checkpoint with a longer block")
        print(f"note: {len(title_poems) - len(kept)} of the {len(title_poems)} titles of {where} left out: their "
              f"prompt does not fit the block_size of every checkpoint (the longest: {longest!r})", file=sys.stderr)
        title_poems = kept
    titles = [p.title for p in title_poems]
    training_lines = {line.strip() for name in ("pretrain_train", "finetune_train") for p in splits[name]
                      for line in p.lines}

    columns = {path: evaluate_checkpoint(ckpt, model, tokenizer, config, splits, titles, training_lines, runtime,
                                         allowed)
               for path, (_, ckpt, model, tokenizer, allowed) in loaded.items()}
    # The ceiling: the real poems of the same titles, measured the same way.
    reference = {"kind": "real poems", **prosody_figures([p.body for p in title_poems])}
    if config.json:
        print(json.dumps({"titles": {"source": source, "count": len(titles)}, "settings": asdict(config),
                          "checkpoints": columns, "reference": reference}, ensure_ascii=False, indent=1))
        return columns
    print(f"device {runtime.describe()}; {len(titles)} unseen titles ({source}); {config.describe()}")
    print(format_table({**columns, "real poems": reference}))
    if any(f.get("instructions") for f in columns.values()):
        print(f"\n{format_instruction_table(columns)}\n({config.task_prompts} prompts per task and form; seen: the "
              "training phrasings in turn; held-out: a phrasing no training sample used)")
    if any(f.get("conversations") for f in columns.values()):
        print(f"\n{format_conversation_table(columns)}\n(up to {config.task_prompts} unseen conversations per "
              "follow-up; a single-turn model's column: the same task asked in one request)")
    return columns


if __name__ == "__main__":
    main()

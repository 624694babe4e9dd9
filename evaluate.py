"""Measure what instruction tuning changed: losses, poems for unseen titles, use of the title.

    python evaluate.py --ckpt ckpt_sft.pt --compare ckpt.pt     # tuned vs base, side by side
    python evaluate.py --ckpt ckpt_sft.pt --eval-poems my_poems/ --json
    python evaluate.py --ckpt ckpt_sft_lora.pt --compare ckpt_sft.pt   # LoRA adapters vs full tuning

One column per checkpoint, each figure described in tanggpt/evaluation.py: losses, poems
for unseen titles (stop, form, diversity, memorisation, rhyme and tones), the title gain and,
for a tuned checkpoint, instruction following.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from data.corpus import clean_poems, load_corpus, load_poems
from data.errors import UserError
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.device import setup_runtime
from tanggpt.evaluation import EvaluationConfig, evaluate_checkpoint, format_instruction_table, format_table
from tanggpt.prosody import prosody_figures


@dataclass
class EvaluateConfig(EvaluationConfig):
    ckpt: str = flag("ckpt_sft.pt", "checkpoint to evaluate")
    compare: str = flag("", "a second checkpoint, evaluated the same way in a second column (e.g. ckpt.pt)")
    base: str = flag("", "for an adapter checkpoint (a --lora-rank run): its base checkpoint, when it is no longer "
                         "at the path the adapters recorded")
    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    eval_poems: str = flag("", "folder of poem JSON files (the same schema): write poems for the titles of every "
                               "poem in it, all treated as unseen, instead of finetune-val titles")
    json: bool = flag(False, "print the figures as one JSON object instead of the table")


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, EvaluateConfig, argv, __doc__.splitlines()[0])


def run(config: EvaluateConfig, explicit: set[str]) -> dict:
    config.validate()
    require_positive(config, ("num_titles", "batch_size"))
    if config.task_prompts < 0:
        raise UserError(f"--task-prompts must not be negative (0 = skip), got {config.task_prompts}")
    runtime = setup_runtime(config.device, config.dtype)
    # Both checkpoints first (an adapter checkpoint with its base): a bad --compare should
    # fail now, not after the first column.
    checkpoints = {path: load_checkpoint(path, flag_name)
                   for path, flag_name in ((config.ckpt, "--ckpt"), (config.compare, "--compare")) if path}
    models = {path: model_and_tokenizer(ckpt, path, config.base, flag_name=flag_name)
              for (path, ckpt), flag_name in zip(checkpoints.items(), ("--ckpt", "--compare"))}
    if config.eval_poems:  # read before the corpus, so a bad folder fails at once
        title_poems = clean_poems(load_poems(config.eval_poems, "--eval-poems"))[0]
        if not title_poems:
            raise UserError(f"--eval-poems {config.eval_poems}: no poems left after cleaning")
    splits = load_corpus(config.poems or None, verbose=False)
    if config.eval_poems:
        source = f"every poem of {config.eval_poems}"
    else:
        title_poems, source = splits["finetune_val"][: config.num_titles], "finetune-val"
    titles = [p.title for p in title_poems]
    training_lines = {line.strip() for name in ("pretrain_train", "finetune_train") for p in splits[name]
                      for line in p.lines}

    columns = {path: evaluate_checkpoint(ckpt, *models[path], config, splits, titles, training_lines, runtime)
               for path, ckpt in checkpoints.items()}
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
    return columns


if __name__ == "__main__":
    main()

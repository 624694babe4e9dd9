"""Instruction tuning (指令微调): teach the pretrained model to answer a title and stop.

    python finetune.py --init ckpt.pt                  # tune the pretrained checkpoint -> ckpt_sft.pt
    python finetune.py --init ckpt.pt --loss-on all    # the book's variant: loss on the prompt too
    python finetune.py --init ckpt.pt --data my.jsonl  # add {"instruction","input","output"} records
    python finetune.py --resume                        # continue the run saved at --out

Every finetune-train poem becomes one sample

    <INS>請用以下題目寫一首詩<INP>{title}<RES>{poem lines joined by \\n}<|endoftext|>

and the model is trained on the response and the end-of-text token. Before the first
epoch and after each one, it writes poems for a fixed list of titles: the gallery shows
the base model rambling on without stopping, and the tuned one answering and stopping.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from checkpoint import model_and_tokenizer
from cli import UserError, flag, resume_rule, run_cli
from data.corpus import load_corpus
from data.instruct import EncodedSample, EpochBatches, Sample, encode_samples, load_instruction_jsonl, poem_sample
from data.tokenizer import Tokenizer
from device import Runtime
from generation import answer_titles, format_answers
from losses import labelled_nll
from metrics import is_regular_form
from model import GPT
from training import Stage, start_runtime, train
from tuning import TuneConfig, finished, open_run


@dataclass
class FinetuneConfig(TuneConfig):
    init: str = flag("", "the pretrained checkpoint to tune (e.g. ckpt.pt); not needed with --resume")
    out: str = flag("ckpt_sft.pt", "checkpoint path; the log, loss plot and samples are written beside it")
    lr: float = flag(3e-4, "peak learning rate (lower than pretraining: adjust the model, don't retrain it)")
    min_lr: float = flag(3e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = flag(50, "steps of linear warmup")
    loss_on: str = flag("response", "response: loss on the poem and end-of-text only; all: on every token",
                        choices=["response", "all"])
    forms: str = flag("regular", "regular: tune on poems of regular form only (all clauses 5 or all 7 characters, "
                                 "paired); all: every poem", choices=["regular", "all"])
    data: str = flag("", "JSONL file of {\"instruction\", \"input\", \"output\"} records to tune on as well")
    data_mode: str = flag("mix", "mix: --data samples join the poem samples; replace: use --data alone",
                          choices=["mix", "replace"])


# What --resume never changes: these decide the samples, their order and the loss, so another
# value would not continue the same run.
RESUME_FIXED = {"seed", "batch_size", "grad_accum", "init", "loss_on", "forms", "data", "data_mode"}


def build_samples(config: FinetuneConfig, poems: dict, extra: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """Train and val samples from the finetune splits (and the --data samples), with the form filter applied."""
    def keep(poem) -> bool:
        return config.forms == "all" or is_regular_form(poem.body)

    train_samples = [poem_sample(p) for p in poems["finetune_train"] if keep(p)]
    val_samples = [poem_sample(p) for p in poems["finetune_val"] if keep(p)]
    if extra:
        train_samples = extra if config.data_mode == "replace" else train_samples + extra
    return train_samples, val_samples


def finetune_stage(config: FinetuneConfig, model: GPT, tokenizer: Tokenizer, batches: EpochBatches,
                   val_rows: list[EncodedSample], titles: list[str], runtime: Runtime, rank: int) -> Stage:
    device = runtime.device
    pad_id = batches.pad_id

    def get_batch(step: int, micro: int):
        x, y = batches.batch(step, micro, rank)
        return x.to(device), y.to(device)

    def response_loss(model: GPT, rows: list) -> float:
        """Mean cross-entropy per response token (prompt and padding excluded), over all rows."""
        nll, count = labelled_nll(model, [(row.inputs, row.response_labels) for row in rows], pad_id,
                                  config.batch_size, runtime)
        return float(nll.sum() / count.sum())

    def evaluate(model: GPT) -> dict:  # labelled_nll puts the model in eval mode and back
        return {"eval_train_loss": response_loss(model, batches.rows[:512]), "val_loss": response_loss(model, val_rows)}

    def sample(model: GPT, step: int) -> str:
        answers = answer_titles(model, tokenizer, titles, runtime, config.sample_tokens, seed=config.seed)
        return format_answers(answers)

    return Stage(
        get_batch=get_batch,
        evaluate=evaluate,
        sample=sample,
        checkpoint_extra={"kind": "sft", "tokenizer": tokenizer.to_dict(), "init": config.init,
                          "loss_on": config.loss_on},
        plot_title=f"instruction tuning: loss on {config.loss_on} tokens, val on response tokens",
        describe_step=lambda step: f"epoch {step / batches.steps_per_epoch:g}",
        sample_before_training=True,
        max_val_loss=2 * math.log(tokenizer.vocab_size),  # far worse than a uniform guess: diverged
    )


def main(argv: list[str] | None = None) -> dict:
    return run_cli(run, FinetuneConfig, argv, __doc__.splitlines()[0], epilog=resume_rule(RESUME_FIXED))


def run(config: FinetuneConfig, explicit: set[str]) -> dict:
    ckpt, source, notes = open_run(config, explicit, "sft", RESUME_FIXED, init_example="ckpt.pt")
    extra = load_instruction_jsonl(config.data) if config.data else []  # a bad file fails before the corpus loads
    dist_info, runtime = start_runtime(config)
    master = dist_info.is_master
    for note in notes if master else []:
        print(note)
    if master and not config.resume and source["kind"] == "sft":
        # Allowed on purpose: tuning a tuned model again (say on your own --data) is a real use.
        print(f"note: --init {config.init} is already instruction-tuned; tuning it further")

    model, tokenizer = model_and_tokenizer(source)
    model.to(runtime.device)
    block_size = model.config.block_size

    splits = load_corpus(config.poems or None, verbose=master)
    train_samples, val_samples = build_samples(config, splits, extra)
    unknown: Counter = Counter()
    train_rows, dropped_train = encode_samples(tokenizer, train_samples, block_size, config.loss_on, unknown)
    val_rows, dropped_val = encode_samples(tokenizer, val_samples, block_size, config.loss_on, unknown)
    if not train_rows:
        raise UserError(f"the finetune-train split is empty ({len(train_samples)} samples before dropping "
                        f"those over block_size {block_size}); use more poems or --data")
    if not val_rows:
        raise UserError("the finetune-val split is empty; use a larger --poems folder")
    titles = config.gallery_titles([s.input for s in val_samples[:3]])  # a poem sample's input is its title

    # Padding comes after each row's end and carries no label, so any id works as pad_id.
    batches = EpochBatches(train_rows, config.batch_size, config.grad_accum, dist_info.world_size, config.seed,
                           pad_id=tokenizer.eot_id)
    steps_per_epoch, per_step = batches.steps_per_epoch, batches.samples_per_step
    max_iters = config.total_steps(steps_per_epoch)
    if finished(ckpt, max_iters, config, master):
        return {}
    stage = finetune_stage(config, model, tokenizer, batches, val_rows, titles, runtime, dist_info.rank)
    if master:
        n_tokens = sum(len(row.inputs) for row in train_rows)
        print(f"device {runtime.describe()}; model {model.num_params():,} parameters from "
              f"{config.out if config.resume else config.init}; tokenizer {tokenizer.name} ({tokenizer.vocab_size:,})")
        print(f"samples: train {len(train_rows):,} ({n_tokens:,} tokens), val {len(val_rows):,}; forms {config.forms}; "
              f"dropped {dropped_train + dropped_val} longer than block_size {block_size}")
        if unknown:
            print(f"{sum(unknown.values()):,} characters outside the vocabulary became <unk>: "
                  + "".join(c for c, _ in unknown.most_common(20)))
        print(f"loss on {config.loss_on} tokens; {per_step} samples per step, {steps_per_epoch} steps per epoch, "
              f"{config.epochs} epochs" + (f", stopped at --max-iters {max_iters}" if config.max_iters else "")
              + f" = {max_iters} steps")
    figures = train(model, config, stage, runtime, max_iters, ckpt, dist_info)
    if master and figures:
        print(f"done: finetune-val response loss {figures['val_loss']:.4f}; checkpoint {config.out}")
    return figures


if __name__ == "__main__":
    main()

"""Where one pretraining or tuning step's time goes: data, the blocks, the output layer and its
loss (forward and backward apart), the optimizer; and the same split's FLOPs.

    python -m tools.profile_step                      # the pretraining defaults, default precision
    python -m tools.profile_step --dtype float32 --optimizer adamw --gpt2 --batch-size 32   # the old defaults
    python -m tools.profile_step --tuning --batch-size 32 --optimizer adamw   # finetune.py's default step
    python -m tools.profile_step --tuning --batch-size 32 --optimizer adamw --no-length-buckets

The step is taken apart the way autograd allows it: the blocks run up to the final norm
(GPT.hidden), their output is detached, and the head and loss run on that copy, so the two
backward passes can be timed one after the other (the head's first, as autograd does).
Each part's time is the median of --repeats steps. Tokens are random ids: speed does not depend on
the text. With --tuning the batches are finetune.py's, from the corpus: its task mixture's
samples, each batch padded to its longest row, so the step's width varies; the line on
padding says how much of the work was padding.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import all_poems, build_tokenizer, load_corpus
from data.batches import random_windows
from data.instruct import EpochBatches
from data.tasks import DEFAULT_TASKS, TaskMixture, parse_tasks, tokenizer_texts, tuning_poems
from model import head_cross_entropy
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.speed import ReferenceModelConfig, describe, reference_model, sync
from tanggpt.training import TrainConfig, configure_optimizer


@dataclass
class ProfileConfig(ReferenceModelConfig):
    repeats: int = flag(7, "steps timed; the median of each part is reported")
    plain_head: bool = flag(False, "the head and loss written plainly (all logits, then F.cross_entropy) instead of "
                                   "model.head_cross_entropy, to see what the chunked one saves")
    tuning: bool = flag(False, "profile a tuning step: finetune.py's batches (its default task mixture of the "
                               "corpus at --poems, padded to each batch's longest sample) instead of pretraining's")
    length_buckets: bool = flag(True, "with --tuning: batches of about one length, as finetune.py makes them "
                                      "(--no-length-buckets: plain shuffled batches)")
    poems: str = flag("", "with --tuning: folder of poem JSON files (default: poems/, downloaded there if empty)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("repeats",))


def tuning_batches(args: ProfileConfig) -> tuple[EpochBatches, int]:
    """finetune.py's epoch-1 batches of its default task mixture, from the corpus, and the
    char tokenizer's vocabulary size (the model's)."""
    splits = load_corpus(args.poems or None, verbose=False)
    tokenizer = build_tokenizer("char", tokenizer_texts(all_poems(splits)))
    mixture = TaskMixture(tuning_poems(splits)[0], parse_tasks(DEFAULT_TASKS), tokenizer, args.block_size)
    batches = EpochBatches(mixture.rows, args.batch_size, pad_id=tokenizer.eot_id,
                           length_buckets=args.length_buckets)
    return batches, tokenizer.vocab_size


def main(argv: list[str] | None = None) -> None:
    run_cli(run, ProfileConfig, argv, __doc__.splitlines()[0])


def run(args: ProfileConfig, explicit: set[str]) -> None:
    args.validate()  # before --tuning loads the corpus
    batches = None
    if args.tuning:
        batches, args.vocab_size = tuning_batches(args)
    runtime, model = reference_model(args)
    config = model.config
    optimizer = configure_optimizer(model, TrainConfig(optimizer=args.optimizer), runtime.device)
    stream = torch.randint(config.vocab_size, (1_000_000,)).numpy().astype("uint16")
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {}
    positions, labelled, real = 0, 0, 0  # the timed steps' batch positions, labelled targets, non-padding tokens

    def clock(name: str, start: float) -> float:
        sync(runtime.device)
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for step in range(args.repeats + 1):  # the first step warms up and is dropped
        t = time.perf_counter()
        if batches is not None:
            x, y = batches.batch(step)
        else:
            x, y = random_windows(stream, args.batch_size, config.block_size, generator)
        x, y = x.to(runtime.device), y.to(runtime.device)
        t = clock("data: draw a batch", t)
        if step > 0:
            rows = batches.rows_of(0) if batches is not None else None
            positions, labelled = positions + x.numel(), labelled + int((y != -100).sum())
            real += sum(len(rows[i].inputs) for i in batches.indices(step)) if rows is not None else x.numel()
        with runtime.autocast():
            h = model.hidden(x)
        t = clock("forward: embeddings and blocks", t)
        hidden = h.detach().requires_grad_()
        with runtime.autocast():
            if args.plain_head:
                logits = model.lm_head(hidden)
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
            else:  # as GPT.forward computes it
                loss = head_cross_entropy(hidden.view(-1, config.n_embd), model.lm_head.weight, y.reshape(-1))
        t = clock(f"forward: output layer ({config.vocab_size:,}-way) and loss", t)
        loss.backward()
        t = clock("backward: output layer and loss", t)
        h.backward(hidden.grad)
        t = clock("backward: blocks and embeddings", t)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock(f"optimizer ({args.optimizer}, with clipping)", t)

    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    total = sum(medians.values())
    tokens = positions // args.repeats  # positions a step, padding included
    C, T, L, V = config.n_embd, tokens // args.batch_size, config.n_layer, config.vocab_size
    flops = {  # training FLOPs per step of each part: 2 per multiply-add forward, 4 backward
        "blocks": 6 * tokens * L * 12 * C * C + 12 * tokens * L * T * C,
        "head": 6 * (labelled // args.repeats) * V * C,  # only labelled positions are scored
    }
    print(f"{describe(model, runtime, args)}: {tokens:,} positions a step"
          + (f" (finetune.py's batches, {'with' if args.length_buckets else 'without'} length buckets: "
             f"{1 - real / positions:.0%} of them padding, {labelled / positions:.0%} labelled)" if args.tuning else ""))
    for name, seconds in medians.items():
        print(f"  {name:<48} {seconds * 1000:8.1f} ms  {seconds / total:6.1%}")
    print(f"  {'the step':<48} {total * 1000:8.1f} ms  = {tokens / total:,.0f} tokens/s")
    print(f"FLOPs a step: blocks {flops['blocks'] / 1e9:.1f} G (attention scores included), output layer "
          f"{flops['head'] / 1e9:.1f} G ({flops['head'] / sum(flops.values()):.0%} of the model's)")


if __name__ == "__main__":
    main()

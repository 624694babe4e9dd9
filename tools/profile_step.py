"""Where one pretraining or tuning step's time goes: data, the blocks, the output layer and its
loss (forward and backward apart), the optimizer; and the same split's FLOPs.

    python -m tools.profile_step                      # the pretraining defaults, default precision
    python -m tools.profile_step --dtype float32 --optimizer adamw --gpt2 --batch-size 32   # the old defaults
    python -m tools.profile_step --tuning --batch-size 32   # finetune.py's default step
    python -m tools.profile_step --tuning --batch-size 32 --length-pieces 1   # each batch padded whole

The step is taken apart the way autograd allows it: the blocks run up to the final norm
(GPT.hidden), their output is detached, and the head and loss run on that copy, so the two
backward passes can be timed one after the other (the head's first, as autograd does).
Each part's time is the median of --repeats steps. Tokens are random ids: speed does not depend on
the text. With --tuning the batches are finetune.py's, from the corpus: its task mixture's
samples, each batch cut by length into --length-pieces pieces padded to their longest
row, so the step's widths vary; the line on padding says how much of the work was padding.
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
    length_buckets: bool = flag(False, "with --tuning: batches of about one length, as finetune.py --length-buckets "
                                       "makes them")
    length_pieces: int = flag(4, "with --tuning: each batch sorted by length and cut into this many pieces, as "
                                 "finetune.py's default does (1 = one padded batch)")
    poems: str = flag("", "with --tuning: folder of poem JSON files (default: poems/, downloaded there if empty)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("repeats", "length_pieces"))


def tuning_batches(args: ProfileConfig) -> tuple[EpochBatches, int]:
    """finetune.py's epoch-1 batches of its default task mixture, from the corpus, and the
    char tokenizer's vocabulary size (the model's)."""
    splits = load_corpus(args.poems or None, verbose=False)
    tokenizer = build_tokenizer("char", tokenizer_texts(all_poems(splits)))
    mixture = TaskMixture(tuning_poems(splits)[0], parse_tasks(DEFAULT_TASKS), tokenizer, args.block_size)
    batches = EpochBatches(mixture.rows, args.batch_size, pad_id=tokenizer.eot_id,
                           length_buckets=args.length_buckets, length_pieces=args.length_pieces)
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
    attended = 0  # the timed steps' (position, key) pairs of attention, padding included

    def clock(name: str, start: float, step: int) -> float:
        """Add the time since `start` to the part's time in this step (a step of pieces runs each part per piece)."""
        sync(runtime.device)
        now = time.perf_counter()
        step_times = times.setdefault(name, [])
        step_times.extend([0.0] * (step + 1 - len(step_times)))
        step_times[step] += now - start
        return now

    for step in range(args.repeats + 1):  # the first step warms up and is dropped
        t = time.perf_counter()
        if batches is not None:
            pieces = batches.pieces(step)
        else:
            pieces = [random_windows(stream, args.batch_size, config.block_size, generator)]
        pieces = [(x.to(runtime.device), y.to(runtime.device)) for x, y in pieces]
        weights = [int((y != -100).sum()) for _, y in pieces]
        t = clock("data: draw a batch", t, step)
        if step > 0:
            positions += sum(x.numel() for x, _ in pieces)
            attended += sum(x.numel() * x.size(1) for x, _ in pieces)
            labelled += sum(weights)
            if batches is not None:
                real += sum(len(row.inputs) for row in batches.rows_at(step))
        for (x, y), weight in zip(pieces, weights):
            with runtime.autocast():
                h = model.hidden(x)
            t = clock("forward: embeddings and blocks", t, step)
            hidden = h.detach().requires_grad_()
            with runtime.autocast():
                if args.plain_head:
                    logits = model.lm_head(hidden)
                    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
                else:  # as GPT.forward computes it
                    loss = head_cross_entropy(hidden.view(-1, config.n_embd), model.lm_head.weight, y.reshape(-1))
            t = clock(f"forward: output layer ({config.vocab_size:,}-way) and loss", t, step)
            (loss * weight / sum(weights)).backward()  # each piece weighted by its labels, as the loop does
            t = clock("backward: output layer and loss", t, step)
            h.backward(hidden.grad)
            t = clock("backward: blocks and embeddings", t, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock(f"optimizer ({args.optimizer}, with clipping)", t, step)

    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    total = sum(medians.values())
    tokens = positions // args.repeats  # positions a step, padding included
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    flops = {  # training FLOPs per step of each part: 2 per multiply-add forward, 4 backward
        "blocks": 6 * tokens * L * 12 * C * C + 12 * (attended // args.repeats) * L * C,
        "head": 6 * (labelled // args.repeats) * V * C,  # only labelled positions are scored
    }
    print(f"{describe(model, runtime, args)}: {tokens:,} positions a step"
          + (f" (finetune.py's batches, {'with' if args.length_buckets else 'without'} length buckets, "
             f"in {args.length_pieces} piece{'s' if args.length_pieces > 1 else ''} by length: "
             f"{1 - real / positions:.0%} of them padding, {labelled / positions:.0%} labelled)" if args.tuning else ""))
    for name, seconds in medians.items():
        print(f"  {name:<48} {seconds * 1000:8.1f} ms  {seconds / total:6.1%}")
    print(f"  {'the step':<48} {total * 1000:8.1f} ms  = {tokens / total:,.0f} tokens/s")
    print(f"FLOPs a step: blocks {flops['blocks'] / 1e9:.1f} G (attention scores included), output layer "
          f"{flops['head'] / 1e9:.1f} G ({flops['head'] / sum(flops.values()):.0%} of the model's)")


if __name__ == "__main__":
    main()

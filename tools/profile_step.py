"""Where one pretraining step's time goes: data, the blocks, the output layer and its loss
(forward and backward apart), the optimizer; and the same split's FLOPs.

    python -m tools.profile_step                      # the pretraining defaults, default precision
    python -m tools.profile_step --dtype float32 --optimizer adamw --gpt2 --batch-size 32   # the old defaults

The step is taken apart the way autograd allows it: the blocks run up to the final norm
(GPT.hidden), their output is detached, and the head and loss run on that copy, so the two
backward passes can be timed one after the other (the head's first, as autograd does).
Each part's time is the median of --repeats steps. Tokens are random ids: speed does not depend on
the text.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.batches import random_windows
from model import head_cross_entropy
from tanggpt.cli import flag, run_cli
from tanggpt.speed import ReferenceModelConfig, describe, reference_model, sync
from tanggpt.training import TrainConfig, configure_optimizer


@dataclass
class ProfileConfig(ReferenceModelConfig):
    repeats: int = flag(7, "steps timed; the median of each part is reported")
    plain_head: bool = flag(False, "the head and loss written plainly (all logits, then F.cross_entropy) instead of "
                                   "model.head_cross_entropy, to see what the chunked one saves")


def main(argv: list[str] | None = None) -> None:
    run_cli(run, ProfileConfig, argv, __doc__.splitlines()[0])


def run(args: ProfileConfig, explicit: set[str]) -> None:
    runtime, model = reference_model(args)
    config = model.config
    optimizer = configure_optimizer(model, TrainConfig(optimizer=args.optimizer), runtime.device)
    stream = torch.randint(config.vocab_size, (1_000_000,)).numpy().astype("uint16")
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {}

    def clock(name: str, start: float) -> float:
        sync(runtime.device)
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(args.repeats + 1):  # the first step warms up and is dropped
        t = time.perf_counter()
        x, y = random_windows(stream, args.batch_size, config.block_size, generator)
        x, y = x.to(runtime.device), y.to(runtime.device)
        t = clock("data: draw a batch", t)
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
    tokens = args.batch_size * config.block_size
    C, T, L, V = config.n_embd, config.block_size, config.n_layer, config.vocab_size
    flops = {  # training FLOPs per step of each part: 2 per multiply-add forward, 4 backward
        "blocks": 6 * tokens * L * 12 * C * C + 12 * tokens * L * T * C,
        "head": 6 * tokens * V * C,
    }
    print(f"{describe(model, runtime, args)}: {tokens:,} tokens a step")
    for name, seconds in medians.items():
        print(f"  {name:<48} {seconds * 1000:8.1f} ms  {seconds / total:6.1%}")
    print(f"  {'the step':<48} {total * 1000:8.1f} ms  = {tokens / total:,.0f} tokens/s")
    print(f"FLOPs a step: blocks {flops['blocks'] / 1e9:.1f} G (attention scores included), output layer "
          f"{flops['head'] / 1e9:.1f} G ({flops['head'] / sum(flops.values()):.0%} of the model's)")


if __name__ == "__main__":
    main()

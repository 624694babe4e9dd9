"""Benchmark: training tokens/s, MFU and peak memory; generation tokens/s with and without the KV cache.

    python -m tools.bench                              # pretrain.py's model and step, default precision
    python -m tools.bench --gpt2 --optimizer adamw --batch-size 32   # the step before docs/speed.md's changes
    python -m tools.bench --only generate              # just the generation figures

The model is pretrain.py's default: the char tokenizer on the Tang corpus (9,274 ids), 8
layers, 4 heads, 128 wide, block 128, the default block, batch 16, Muon. Tokens are random ids: speed does
not depend on the text. Each figure is the median of --repeats timed windows. MFU
compares the model's FLOPs per second with a matmul this script times on the same
machine in the same precision, so it says how close the training step gets to what the
hardware does on the one operation that dominates it; the fp32 and bf16 matmuls are both
timed, so the first line shows which path a machine takes and why. Each training and
generation figure comes with the same model run as plain GPT code would run it (nanoGPT:
all logits then F.cross_entropy, torch's AdamW, no cache), in the same run.
"""

from __future__ import annotations

import copy
import resource
import statistics
import time

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data.errors import UserError
from model import GPT, GPTConfig, draw
from tanggpt.cli import flag, require_positive, run_cli
from tanggpt.device import Runtime
from tanggpt.speed import ReferenceModelConfig, describe, reference_model, sync
from tanggpt.generation import for_generation
from tanggpt.losses import causal_lm_loss
from tanggpt.training import TrainConfig, configure_optimizer


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_flops(runtime: Runtime, size: int = 2048, repeats: int = 5) -> float:
    """Measured FLOP/s of a square matmul in the runtime's precision: the machine's practical peak.

    The matrices are size x size, or smaller where one product would take over 0.1 s: a CPU
    without native bf16 emulates it about a hundred times slower than fp32."""
    n = 256
    while True:
        a = torch.randn(n, n, device=runtime.device, dtype=runtime.dtype)
        b = torch.randn(n, n, device=runtime.device, dtype=runtime.dtype)
        seconds = timed(lambda: a @ b, 1, runtime.device)[0]  # also the warm-up
        if n >= size or seconds * 8 > 0.1:  # the next size up costs 8 times as much
            break
        n *= 2
    times = timed(lambda: [a @ b for _ in range(3)], repeats, runtime.device)
    return 3 * 2 * n**3 / statistics.median(times)


def flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token (nanoGPT's estimate): 6 per matmul weight, plus attention scores."""
    n = config.n_layer * 12 * config.n_embd**2 + config.vocab_size * config.n_embd  # blocks + tied head
    return 6 * n + 12 * config.n_layer * config.n_embd * config.block_size


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime) -> None:
    """The training step's compute: forward under the precision policy, backward."""
    with runtime.autocast():
        loss = causal_lm_loss(model, (x, y))
    loss.backward()


def plain_forward_backward(model: GPT, x: torch.Tensor, y: torch.Tensor, runtime: Runtime) -> None:
    """The step as plain GPT code writes it (nanoGPT): every position's logits, then F.cross_entropy."""
    logits, _ = model(x)
    F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).backward()


def bench_training(model: GPT, runtime: Runtime, args, plain: bool = False) -> dict:
    """Training tokens/s of the project's step, or with plain=True of plain fp32 eager GPT code
    for the same model: plain_forward_backward and torch's AdamW, no compile, no autocast."""
    config = model.config
    if plain:
        model = copy.deepcopy(model).float()
        runtime = Runtime(runtime.device, torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        step_model, forward_backward_ = model, plain_forward_backward
    else:
        optimizer = configure_optimizer(model, TrainConfig(optimizer=args.optimizer), runtime.device)
        step_model = torch.compile(model) if args.compile else model
        forward_backward_ = forward_backward
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(config.vocab_size, (args.batch_size, config.block_size), generator=gen).to(runtime.device)
    y = torch.randint(config.vocab_size, (args.batch_size, config.block_size), generator=gen).to(runtime.device)

    def steps() -> None:
        for _ in range(args.steps):
            forward_backward_(step_model, x, y, runtime)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    forward_backward_(step_model, x, y, runtime)  # compiles, if compiling
    optimizer.zero_grad(set_to_none=True)
    first_step = time.perf_counter() - start
    steps()  # warm up
    times = timed(steps, args.repeats, runtime.device)
    tokens_per_s = args.steps * args.batch_size * config.block_size / statistics.median(times)
    peak = matmul_flops(runtime)
    achieved = tokens_per_s * flops_per_token(config)
    return {
        "train_tokens_per_s": tokens_per_s,
        "first_step_s": first_step,
        "matmul_gflops": peak / 1e9,
        "model_gflops": achieved / 1e9,
        "mfu": achieved / peak,
        "peak_memory_mib": peak_memory_mib(runtime.device),
    }


@torch.no_grad()
def plain_generate(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding as plain GPT code writes it (nanoGPT's generate): no cache, the whole
    context (cropped to block_size) through the model for each new token, the last position's
    logits only."""
    idx = torch.tensor([prompt], device=model.wte.weight.device)
    for _ in range(new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:], last_only=True)
        idx = torch.cat((idx, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    return idx[0, len(prompt):].tolist()


def in_turns(variants: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each variant, timed once a round, in turns, for `repeats` rounds.

    On a shared machine the speed drifts by a third within a minute: timing one variant's
    windows, then the other's, compares two moments as much as two variants. Within a round
    both met about the same load, so a ratio is taken round by round (`ratio`)."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds[name] += timed(fn, 1, device)
    return seconds


def ratio(seconds: dict[str, list[float]], slow: str, fast: str) -> float:
    """How many times as fast `fast` was as `slow`: the median of the rounds' ratios."""
    return statistics.median(s / f for s, f in zip(seconds[slow], seconds[fast]))


def bench_generation(model: GPT, runtime: Runtime, args) -> dict:
    """Greedy generation's tokens/s: one sample with the KV cache (eager and with the decoding
    step compiled), without it, plain GPT code's loop, and a batch with the cache (eager and
    compiled), each variant of one size timed in turns (`in_turns`) and compared round by
    round; the seconds the first compiled call of each batch size took; and the ms that
    drawing the batch's next ids takes, model.draw against torch.multinomial."""
    model = for_generation(copy.deepcopy(model), runtime)  # as sample.py and evaluate.py do
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(FIRST_PROMPT_ID, model.config.vocab_size, (12,), generator=gen).tolist()
               for _ in range(args.gen_batch)]
    n = args.new_tokens
    figures = {}

    def generating(batch: list[list[int]], **kwargs) -> Callable[[], object]:
        return lambda: model.generate(batch, n, temperature=0, **kwargs)

    one = {"cache": generating(prompts[:1]), "no_cache": generating(prompts[:1], use_cache=False),
           "plain": lambda: plain_generate(model, prompts[0], n)}
    batch = {"batched": generating(prompts)}
    if args.compile_decode:
        one["compiled"] = generating(prompts[:1], compile=True)
        batch["batched_compiled"] = generating(prompts, compile=True)
    for variants in (one, batch):  # the untimed first calls: warm-up, and the compiled ones compile
        for name, fn in variants.items():
            figures[f"first_call_s_{name}"] = timed(fn, 1, runtime.device)[0]
    for variants, reference, rows in ((one, "plain", 1), (batch, "batched", args.gen_batch)):
        seconds = in_turns(variants, args.repeats, runtime.device)
        for name, times in seconds.items():
            figures[f"gen_tokens_per_s_{name}"] = n * rows / statistics.median(times)
            if name != reference:
                figures[f"gen_speedup_{name}"] = ratio(seconds, reference, name)
        if "no_cache" in seconds:
            figures["gen_speedup_cache_no_cache"] = ratio(seconds, "no_cache", "cache")
    # Answers are sampled, not greedy: the draw of a batch's next ids, from the model's own
    # scores for the prompts, one uniform number a row (model.draw) against torch.multinomial.
    with torch.no_grad():
        logits, _ = model(torch.tensor(prompts, device=runtime.device)[:, -model.config.block_size:], last_only=True)
    probs = (logits[:, -1].float() / 0.8).softmax(dim=-1)
    sampler = torch.Generator(device=runtime.device).manual_seed(2)
    for name, pick in (("draw", lambda: draw(probs, sampler)),
                       ("multinomial", lambda: torch.multinomial(probs, 1, generator=sampler))):
        figures[f"sample_ms_{name}"] = 1e3 * statistics.median(timed(lambda: [pick() for _ in range(10)], args.repeats,
                                                                         runtime.device)) / 10
    return figures


FIRST_PROMPT_ID = 5  # the generation prompts' random ids start above the char tokenizer's 5 specials


@dataclass
class BenchConfig(ReferenceModelConfig):
    compile: bool = flag(False, "torch.compile the training step")
    steps: int = flag(5, "training steps per timed window")
    repeats: int = flag(5, "timed windows; the median is reported")
    new_tokens: int = flag(120, "tokens generated per sample")
    gen_batch: int = flag(32, "prompts in the batched generation figure")
    only: str = flag("both", "which half to run: train, generate or both", choices=["both", "train", "generate"])
    compile_decode: bool = flag(True, "also time generation with the decoding step compiled (GPT.generate's "
                                      "compile; its first call compiles, and is not timed)")

    def validate(self) -> None:
        super().validate()
        require_positive(self, ("steps", "repeats", "new_tokens", "gen_batch"))
        if self.only != "train" and self.vocab_size <= FIRST_PROMPT_ID:
            raise UserError(f"--vocab-size {self.vocab_size}: the generation figures' prompts draw ids from "
                            f"{FIRST_PROMPT_ID} up, so it must be above {FIRST_PROMPT_ID} (or give --only train)")


def main(argv: list[str] | None = None) -> None:
    # stop_on_closed_pipe: the figures are the only product; with no reader there is nothing left to time
    run_cli(run, BenchConfig, argv, __doc__.splitlines()[0], stop_on_closed_pipe=True)


def run(args: BenchConfig, explicit: set[str]) -> None:
    args.validate()
    runtime, model = reference_model(args)
    print(f"{describe(model, runtime, args)}, compile {args.compile}")
    roofs = {name: matmul_flops(Runtime(runtime.device, dtype)) / 1e9
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"square matmul: fp32 {roofs['fp32']:.1f} GFLOP/s, bf16 {roofs['bf16']:.1f} GFLOP/s: this machine trains "
          f"in {runtime.describe().split(', ')[-1]} (tanggpt/device.py)")
    if args.only in ("both", "train"):
        f = bench_training(model, runtime, args)
        print(f"train: {f['train_tokens_per_s']:,.0f} tokens/s | model {f['model_gflops']:.1f} GFLOP/s of a measured "
              f"{f['matmul_gflops']:.1f} GFLOP/s matmul = MFU {f['mfu']:.1%} | peak memory {f['peak_memory_mib']:,.0f} MiB"
              f" | first step {f['first_step_s']:.1f} s")
        p = bench_training(model, runtime, args, plain=True)
        print(f"plain fp32 eager GPT code, the same model (all logits, F.cross_entropy, torch AdamW): "
              f"{p['train_tokens_per_s']:,.0f} tokens/s, MFU {p['mfu']:.1%} of a measured {p['matmul_gflops']:.1f} "
              f"GFLOP/s fp32 matmul | this step is {f['train_tokens_per_s'] / p['train_tokens_per_s']:.2f}x as fast")
    if args.only in ("both", "generate"):
        g = bench_generation(model, runtime, args)
        rounds = f"{args.repeats} round{'s' if args.repeats > 1 else ''}"
        print(f"generate {args.new_tokens} tokens, one sample, timed in turns ({rounds}; each ratio the median of the "
              f"rounds'): {g['gen_tokens_per_s_cache']:,.0f} tokens/s with KV cache, "
              f"{g['gen_tokens_per_s_no_cache']:,.0f} without ({g['gen_speedup_cache_no_cache']:.1f}x); plain GPT "
              f"code's loop (nanoGPT's generate, no cache) {g['gen_tokens_per_s_plain']:,.0f} "
              f"({g['gen_speedup_cache']:.1f}x); batch of {args.gen_batch}: {g['gen_tokens_per_s_batched']:,.0f} "
              f"tokens/s ({g['gen_tokens_per_s_batched'] / g['gen_tokens_per_s_cache']:.1f}x one at a time)")
        print(f"sampling the batch of {args.gen_batch}'s next ids (temperature 0.8): {g['sample_ms_draw']:.2f} ms with "
              f"one uniform number a row (model.draw), {g['sample_ms_multinomial']:.2f} ms with torch.multinomial "
              f"({g['sample_ms_multinomial'] / g['sample_ms_draw']:.1f}x)")
        if args.compile_decode:
            print(f"decoding step compiled: one sample {g['gen_tokens_per_s_compiled']:,.0f} tokens/s "
                  f"({g['gen_speedup_compiled']:.1f}x plain GPT code's loop), "
                  f"batch of {args.gen_batch} {g['gen_tokens_per_s_batched_compiled']:,.0f} tokens/s "
                  f"({g['gen_speedup_batched_compiled']:.2f}x eager); its first call took "
                  f"{g['first_call_s_compiled']:.1f} s (compiling), the batch's {g['first_call_s_batched_compiled']:.1f} s")


if __name__ == "__main__":
    main()

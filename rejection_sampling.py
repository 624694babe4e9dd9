"""Rejection sampling (拒绝采样): the tuned model answers each prompt N times; the rules keep the best answer.

    python rejection_sampling.py --init ckpt_dpo.pt                     # -> best_answers.jsonl
    python finetune.py --init ckpt_dpo.pt --data best_answers.jsonl --data-mode replace --out ckpt_rs.pt
    python rejection_sampling.py --init ckpt_dpo.pt --tasks acrostic --samples-per-prompt 16

The step before reinforcement learning in the texts this course follows, and the baseline
rl.py must beat. The same requests as rl.py's (tanggpt/rollouts.py: the alignment split's
poems, each a task the rules judge, asked with a training phrasing), the same rules and
weights (tanggpt/rewards.py); but instead of nudging the policy after every group, it
samples all the groups from the --init model, keeps each group's best answer (if it stopped
and scored at least --min-reward), and writes them as instruction records. Instruction
tuning on them (finetune.py --data ... --data-mode replace) teaches the model its own best
answers: learning from a reward, offline, with the loss the course already has.

The answers are sampled in chunks of --chunk-prompts prompts, each with a generator seeded
by its index, and each chunk's result is appended to --out's `.partial` file as it is done:
Ctrl-C or SIGTERM stops after the chunk in hand, and the same command continues where it
stopped (the same answers as a run never interrupted). --out itself is written once, whole,
at the end.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm import tqdm

from data.corpus import DEFAULT_POEMS_DIR, corpus_fingerprint, corpus_folder, load_corpus
from data.errors import UserError
from tanggpt.atomic import atomic_write, atomic_write_text, check_output
from tanggpt.checkpoint import answers_prompts, input_fingerprint, model_fingerprint, refuse_chat_model
from tanggpt.cli import RunInterrupted, RuntimeConfig, flag, require_positive, run_cli
from tanggpt.device import setup_runtime
from tanggpt.generation import for_generation, load_for_sampling
from tanggpt.rewards import RewardWeights
from tanggpt.rollouts import RL_TASKS, Rollout, best_of_groups, fitting, make_requests, parse_rl_tasks, roll_out
from tanggpt.run_files import refuse_inputs_as_outputs
from tanggpt.training import StopFlag


@dataclass
class RejectionConfig(RuntimeConfig, RewardWeights):
    init: str = flag("", "the tuned checkpoint that writes the answers (e.g. ckpt_dpo.pt or ckpt_sft.pt)")
    out: str = flag("best_answers.jsonl", "where to write the kept answers, as {\"instruction\", \"input\", "
                                          "\"output\"} records (with their task and reward) for finetune.py --data")
    poems: str = flag("", "folder of poem JSON files (default: poems/, downloaded there if empty)")
    tasks: str = flag("all", "the tasks to ask: all, or a comma-separated list of " + ", ".join(RL_TASKS) +
                               ", each optionally with a weight (acrostic:2 is asked twice as often)")
    prompts: int = flag(2400, "alignment-split prompts to answer (0 = all of them); 2,400 x 8 answers is the "
                              "sampling rl.py's defaults do (300 steps of 8 prompts x 8)")
    samples_per_prompt: int = flag(8, "answers sampled per prompt, the best of which is kept")
    min_reward: float = flag(1.0, "keep a prompt's best answer only if its reward is at least this (1 = every rule "
                                  "kept; 0 = always the best)")
    same_shape: bool = flag(True, "for a title or a continuation, keep the best of the answers that have the shape "
                                  "(4 or 8 clauses) of the prompt's first answer: the kept answers are then quatrains "
                                  "as often as the model's own are (without it, quatrains, with fewer rhymes to get "
                                  "right, win; docs/rl.md)")
    temperature: float = flag(1.0, "sampling temperature of the answers")
    max_new_tokens: int = flag(80, "length limit of each answer, in tokens")
    batch_size: int = flag(64, "answers generated together (rows of one batch)")
    chunk_prompts: int = flag(32, "prompts per chunk: the unit of progress saved in --out's .partial file")
    seed: int = flag(1337, "seed of the requests (tasks, forms, phrasings) and of the answers")
    overwrite: bool = flag(False, "replace --out if it exists (it is replaced at the end, whole)")

    def validate(self) -> None:
        RewardWeights.validate(self, parse_rl_tasks(self.tasks))
        require_positive(self, ("samples_per_prompt", "max_new_tokens", "batch_size", "chunk_prompts"))
        if self.prompts < 0:
            raise UserError(f"--prompts must not be negative (0 = all), got {self.prompts}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature:g}")
        if not 0 <= self.min_reward <= 1:
            raise UserError(f"--min-reward must be in [0, 1] (a reward is), got {self.min_reward:g}")

    def partial_path(self) -> Path:
        return Path(f"{self.out}.partial")


# What decides the answers and which are kept: a .partial file made under another key is not continued.
SAMPLING_SETTINGS = ("tasks", "prompts", "samples_per_prompt", "min_reward", "same_shape", "temperature",
                     "max_new_tokens", "batch_size", "chunk_prompts", "seed", *(f.name for f in fields(RewardWeights)))


def read_partial(path: Path, key: dict) -> tuple[list[dict], str]:
    """The chunks saved at `path` under `key` ([] and why not, if none can be continued). A
    last line cut short by a kill is dropped: its chunk is sampled again."""
    if not path.exists():
        return [], ""
    lines = path.read_bytes().decode("utf-8", "replace").split("\n")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        return [], f"{path} is not a rejection-sampling progress file; starting anew"
    if not isinstance(header, dict) or header.get("key") != key:
        return [], f"{path} was made with other settings or another --init; starting anew"
    chunks = []
    for line in lines[1:]:
        try:
            chunk = json.loads(line)
        except json.JSONDecodeError:
            break  # the line a kill cut short (or the empty string after the last newline)
        if not isinstance(chunk, dict) or chunk.get("chunk") != len(chunks):
            return [], f"{path} holds chunks out of order; starting anew"
        chunks.append(chunk)
    return chunks, ""


def append_line(path: Path, record: dict) -> None:
    """One JSON line appended and flushed to disk: a kill loses at most the line being written."""
    with open(path, "ab") as f:
        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
        f.flush()
        os.fsync(f.fileno())


def chunk_result(rollouts: list[Rollout], config: RejectionConfig) -> dict:
    """A chunk's kept answers as instruction records, and what it saw per task: prompts asked,
    answers kept, the sum of all answers' rewards and of the best answers' rewards."""
    group = config.samples_per_prompt
    best = best_of_groups(rollouts, group, 0.0, config.same_shape)
    counts: dict[str, list[float]] = {}
    records = []
    for i, top in enumerate(best):
        request = rollouts[i * group].request
        seen = counts.setdefault(request.task, [0, 0, 0.0, 0.0])
        seen[0] += 1
        seen[2] += sum(r.reward.total for r in rollouts[i * group : (i + 1) * group])
        seen[3] += top.reward.total if top is not None else 0.0
        if top is not None and top.reward.total >= config.min_reward:
            seen[1] += 1
            records.append({"instruction": request.instruction, "input": request.input, "output": top.text,
                            "task": request.task, **({"form": request.form} if request.form else {}),
                            "reward": round(top.reward.total, 4)})
    return {"records": records, "counts": counts}


def main(argv: list[str] | None = None) -> Path:
    return run_cli(run, RejectionConfig, argv, __doc__.splitlines()[0])


def run(config: RejectionConfig, explicit: set[str]) -> Path:
    config.validate()
    if not config.init:
        raise UserError("--init: give the tuned checkpoint that writes the answers, e.g. --init ckpt_dpo.pt")
    out, partial = Path(config.out), config.partial_path()
    if out.suffix != ".jsonl":
        raise UserError(f"--out {out}: give a .jsonl path (finetune.py --data reads JSON lines)")
    check_output(out, "--out", example="a .jsonl path")
    refuse_inputs_as_outputs({"--out": out, "--out's progress file": partial}, {"--init": Path(config.init)},
                             config.poems or DEFAULT_POEMS_DIR)
    if out.exists() and not config.overwrite:
        raise UserError(f"--out {out} exists; give another --out, or --overwrite to replace it")
    ckpt, model, tokenizer = load_for_sampling(config.init, "--init")
    refuse_chat_model(ckpt, "--init", config.init, "rejection_sampling.py")
    if not answers_prompts(ckpt["kind"]):
        raise UserError(f"--init {config.init} is a {ckpt['kind']} checkpoint: it does not answer the instruction "
                        "prompt or stop; tune it first (python finetune.py --init ...), then sample the tuned one")
    runtime = setup_runtime(config.device, config.dtype)
    splits = load_corpus(config.poems or None)
    block_size = model.config.block_size
    requests = fitting(make_requests(splits["alignment"], parse_rl_tasks(config.tasks), config.seed), tokenizer,
                       block_size, config.max_new_tokens)
    requests = requests[: config.prompts] if config.prompts else requests
    if not requests:
        raise UserError(f"no alignment-split prompt leaves --max-new-tokens {config.max_new_tokens} of the model's "
                        f"block_size {block_size} free; give a smaller --max-new-tokens")
    key = {"init_fingerprint": model_fingerprint(model.state_dict()), "precision": str(runtime.dtype),
           "poems": corpus_fingerprint(corpus_folder(config.poems or None)),
           "requests": input_fingerprint([asdict(r) for r in requests]),
           **{name: getattr(config, name) for name in SAMPLING_SETTINGS}}
    chunks, note = read_partial(partial, key)
    if note:
        print(f"note: {note}")
    size = config.chunk_prompts
    n_chunks = -(-len(requests) // size)
    print(f"device {runtime.describe()}; --init {config.init} ({ckpt['kind']}); {len(requests):,} prompts x "
          f"{config.samples_per_prompt} answers, tasks {config.tasks}; keeping each prompt's best answer if it scores "
          f"at least {config.min_reward:g}")
    if chunks:
        print(f"continuing from {partial}: {len(chunks)} of {n_chunks} chunks already sampled")
    # The progress file rewritten whole before any chunk is appended: the key, then the chunks read
    # back, so a line a kill cut short is gone and the next chunk does not land after it.
    lines = [{"key": key}, *chunks]
    atomic_write(partial, lambda f: f.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
                                             .encode("utf-8", "backslashreplace")))
    writer = for_generation(model, runtime)
    with StopFlag() as stop, tqdm(total=n_chunks, initial=len(chunks), unit="chunk") as bar:
        for index in range(len(chunks), n_chunks):
            if stop.requested:
                raise RunInterrupted(f"{len(chunks)} of {n_chunks} chunks saved in {partial}; run the same command "
                                     "to continue", stop.signum)
            generator = torch.Generator(device=runtime.device).manual_seed(config.seed * 1_000_003 + index)
            rollouts = roll_out(writer, tokenizer, requests[index * size : (index + 1) * size],
                                config.samples_per_prompt, runtime, config.max_new_tokens, config.temperature,
                                generator, weights=config, batch_size=config.batch_size)
            chunk = {"chunk": index, **chunk_result(rollouts, config)}
            append_line(partial, chunk)
            chunks.append(chunk)
            bar.update(1)
    records = [record for chunk in chunks for record in chunk["records"]]
    if not records:
        raise UserError(f"no answer of {len(requests):,} prompts stopped and scored at least --min-reward "
                        f"{config.min_reward:g}; lower it (0 keeps every prompt's best), or sample more per prompt")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    partial.unlink()
    print(summary(chunks, config.samples_per_prompt))
    print(f"kept {len(records):,} answers of {len(requests):,} prompts: {out}\n"
          f"next: python finetune.py --init {config.init} --data {out} --data-mode replace --out ckpt_rs.pt")
    return out


def summary(chunks: list[dict], samples_per_prompt: int) -> str:
    """Per task: prompts, answers kept, mean reward of all answers and of each prompt's best."""
    totals: dict[str, Counter] = {}
    for chunk in chunks:
        for task, (prompts, kept, all_sum, best_sum) in chunk["counts"].items():
            totals.setdefault(task, Counter()).update(prompts=prompts, kept=kept, all=all_sum, best=best_sum)
    lines = [f"{'task':<10} {'prompts':>8} {'kept':>8} {'reward, all':>12} {'reward, best':>13}"]
    for task, t in sorted(totals.items()):
        mean_all, mean_best = t["all"] / (t["prompts"] * samples_per_prompt), t["best"] / t["prompts"]
        lines.append(f"{task:<10} {t['prompts']:>8,} {t['kept']:>8,} {mean_all:>12.3f} {mean_best:>13.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

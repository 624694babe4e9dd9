"""Preference pairs (偏好对) for DPO: two of the tuned model's own answers to one prompt, one better.

DPO learns from pairs (prompt, chosen answer, rejected answer). Here the prompts are the
titles of the alignment split, poems no earlier stage trained on; for each one the tuned
model writes `samples_per_prompt` answers, and a *preference* judges them with the
prosody checks (prosody.py):

- tonal (the default): both answers are 絕句/律詩-shaped (4 or 8 lines of 5 or 7
  characters); the chosen keeps the tonal pattern (平仄), the rejected breaks it. About
  half of the tuned model's shaped answers keep it (real poems: about 70 %): a skill it
  has, unevenly, which preference tuning can make the rule.
- shape: the chosen is 絕句/律詩-shaped, the rejected is not (both stopped).
- rhyme: the chosen is written with the rhyme enforced (prosody.RhymeConstraint) and
  rhymes; the rejected is a free answer, shaped, that does not. The model cannot write
  the chosen answers by itself: this is the preference that shows what DPO cannot do.
- real: the title's own poem from the corpus over the model's answer (as in SPIN, Chen et
  al. 2024): another chosen answer the model did not write. Any answer can be the
  rejected one, even one cut at the length limit, so even a barely trained model gets pairs.

Both answers of a pair answer the same prompt and (but for `real`'s rejected answers)
ended with <|endoftext|>; a prompt gives at most one pair (its first chosen and first
rejected answer). The reference
model's log-probability of each answer (the `init` model, before any preference tuning)
is computed once, here, and stored with the pair: DPO needs no second model in memory.

Building pairs means sampling thousands of answers, so they are cached in a JSON file
(readable: look at what the model is taught to prefer) together with the key they were
built under: the model's fingerprint and every setting that changes them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from data.errors import UserError
from data.forms import regular_clauses
from data.instruct import INSTRUCTION, EncodedSample, Sample, encode_sample, pad_batch, title_prompt_ids
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.atomic import atomic_write_text
from tanggpt.device import Runtime
from tanggpt.generation import Answer, answer_titles
from tanggpt.losses import PreferenceBatch, dpo_loss, labelled_nll
from tanggpt.prosody import RhymeConstraint, keeps_tonal_pattern, load_table, rhymes

PREFERENCES = ("tonal", "shape", "rhyme", "real")


@dataclass
class Pair:
    title: str
    chosen: str
    rejected: str
    reference_chosen: float = 0.0  # log pi_ref(chosen | prompt), response and end-of-text, in nats
    reference_rejected: float = 0.0


def judge(preference: str, answer: Answer) -> str | None:
    """'chosen', 'rejected' or None (neither: the answer takes no part in a pair)."""
    if preference not in PREFERENCES:
        raise ValueError(f"unknown preference {preference!r}; choose from {', '.join(PREFERENCES)}")
    if preference == "real":
        return "rejected"  # the chosen answer is the corpus's poem, never the model's
    if not answer.stopped:
        return None  # every answer in a pair ends with end-of-text
    lines = regular_clauses(answer.response)
    if preference == "shape":
        return "chosen" if lines is not None else "rejected"
    if lines is None:
        return None  # tonal and rhyme compare shaped answers only: the pair differs in one thing
    good = keeps_tonal_pattern(lines, load_table()) if preference == "tonal" else rhymes(lines, load_table())
    return "chosen" if good else "rejected"


@dataclass
class PairCounts:
    """What sampling found, for the summary line and for the error when no pair is found."""

    prompts: int
    answers: int
    chosen: int  # answers judged chosen
    rejected: int
    pairs: int

    def summary(self) -> str:
        return (f"{self.prompts:,} prompts, {self.answers:,} answers: {self.chosen:,} could be chosen, "
                f"{self.rejected:,} rejected -> {self.pairs:,} pairs")


def build_pairs(model: GPT, tokenizer: Tokenizer, titles: list[str], preference: str, samples_per_prompt: int,
                runtime: Runtime, block_size: int, temperature: float, seed: int, batch_size: int = 64,
                real_poems: list[str] | None = None) -> tuple[list[Pair], PairCounts]:
    """Sample answers for every title and pair them by the preference (see the module doc).

    `model` is the generation copy (see generation.for_generation). With the rhyme
    preference the chosen candidates come from a second pass with the rhyme enforced;
    with `real`, they are `real_poems`, the titles' own poems. Each answer may be as long as
    fits the block after its batch's longest prompt: a longer one could not be trained on.
    """
    def sample(allowed: Callable | None, pass_seed: int, label: str) -> list[list[Answer]]:
        answers: list[Answer] = []
        chunk = max(1, batch_size // samples_per_prompt) * samples_per_prompt
        repeated = [t for t in titles for _ in range(samples_per_prompt)]
        for start in tqdm(range(0, len(repeated), chunk), desc=label, unit="batch", dynamic_ncols=True):
            batch = repeated[start : start + chunk]
            room = block_size - max(len(title_prompt_ids(tokenizer, t)) for t in batch)
            # each chunk its own seed: the answers do not depend on how many came before
            answers += answer_titles(model, tokenizer, batch, runtime, max(room, 1),
                                     temperature=temperature, seed=pass_seed + start, batch_size=chunk,
                                     allowed=allowed)
        return [answers[i : i + samples_per_prompt] for i in range(0, len(answers), samples_per_prompt)]

    free = sample(None, seed, "sampling answers")
    verdicts = [[judge(preference, a) for a in group] for group in free]
    if preference == "rhyme":  # the chosen side: the same model, with the sampler enforcing the rhyme
        enforced = sample(RhymeConstraint(tokenizer), seed + 1_000_003, "sampling rhymed answers")
        chosen_side = [[a for a in group if judge("rhyme", a) == "chosen"] for group in enforced]
        rejected_side = [[a for a, v in zip(group, vs) if v == "rejected"] for group, vs in zip(free, verdicts)]
        answers = 2 * len(titles) * samples_per_prompt
    elif preference == "real":
        chosen_side = [[Answer(title, poem, True)] for title, poem in zip(titles, real_poems)]
        rejected_side = free
        answers = len(titles) * samples_per_prompt
    else:
        chosen_side = [[a for a, v in zip(group, vs) if v == "chosen"] for group, vs in zip(free, verdicts)]
        rejected_side = [[a for a, v in zip(group, vs) if v == "rejected"] for group, vs in zip(free, verdicts)]
        answers = len(titles) * samples_per_prompt
    pairs = []
    for title, chosen, rejected in zip(titles, chosen_side, rejected_side):
        for better in chosen:  # the first chosen answer with a rejected one that differs from it
            worse = next((r for r in rejected if r.response != better.response), None)  # (a real poem, written word for word)
            if worse is not None:
                pairs.append(Pair(title, better.response, worse.response))
                break
    counts = PairCounts(len(titles), answers, sum(map(len, chosen_side)), sum(map(len, rejected_side)), len(pairs))
    return pairs, counts


# -----------------------------------------------------------------------------
# Pairs as training rows


def encode_pair(tokenizer: Tokenizer, pair: Pair) -> tuple[EncodedSample, EncodedSample]:
    """The chosen and the rejected sample, each prompt + answer + end-of-text, labelled on the answer."""
    return tuple(encode_sample(tokenizer, Sample(INSTRUCTION, pair.title, answer), "response")
                 for answer in (pair.chosen, pair.rejected))


def fits(tokenizer: Tokenizer, pair: Pair, block_size: int) -> bool:
    return all(len(sample.inputs) <= block_size for sample in encode_pair(tokenizer, pair))


def answer_logprobs(model: GPT, tokenizer: Tokenizer, pairs: list[Pair], runtime: Runtime,
                    batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(chosen | prompt) and log p(rejected | prompt) of each pair under `model` (eval
    mode, the runtime's autocast, as training computes them): minus the answers' summed NLL."""
    rows = [(sample.inputs, sample.labels) for pair in pairs for sample in encode_pair(tokenizer, pair)]
    nll, _ = labelled_nll(model, rows, tokenizer.eot_id, batch_size, runtime)
    return -nll[0::2], -nll[1::2]


def reference_logprobs(model: GPT, tokenizer: Tokenizer, pairs: list[Pair], runtime: Runtime,
                       batch_size: int = 64) -> None:
    """Fill in each pair's reference log-probabilities: its answers' under `model`, the reference."""
    chosen, rejected = answer_logprobs(model, tokenizer, pairs, runtime, batch_size)
    for pair, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
        pair.reference_chosen, pair.reference_rejected = c, r


def pair_batch(tokenizer: Tokenizer, pairs: list[Pair]) -> PreferenceBatch:
    """Pairs -> one padded batch: the chosen answers, then the rejected ones (see losses.PreferenceBatch)."""
    encoded = [encode_pair(tokenizer, pair) for pair in pairs]
    rows = [e[0] for e in encoded] + [e[1] for e in encoded]
    inputs, labels = pad_batch([(row.inputs, row.labels) for row in rows], tokenizer.eot_id)
    reference = torch.tensor([p.reference_chosen for p in pairs] + [p.reference_rejected for p in pairs])
    return PreferenceBatch(inputs, labels, reference)


def split_pairs(pairs: list[Pair], val_share: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded shuffle, cut into train and held-out pairs (at least one of each)."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(pairs) - 1, max(1, round(len(pairs) * val_share)))
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


def pair_figures(model: GPT, tokenizer: Tokenizer, pairs: list[Pair], beta: float, batch_size: int,
                 runtime: Runtime) -> dict:
    """DPO loss, reward accuracy and margin, and the policy's mean log-probabilities, over pairs."""
    chosen, rejected = answer_logprobs(model, tokenizer, pairs, runtime, batch_size)
    terms = dpo_loss(chosen, rejected, torch.tensor([p.reference_chosen for p in pairs]),
                     torch.tensor([p.reference_rejected for p in pairs]), beta)
    margins = terms.chosen_rewards - terms.rejected_rewards
    return {"dpo_loss": float(terms.losses.mean()), "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean()), "chosen_reward": float(terms.chosen_rewards.mean()),
            "rejected_reward": float(terms.rejected_rewards.mean()), "chosen_logp": float(chosen.mean()),
            "rejected_logp": float(rejected.mean())}


# -----------------------------------------------------------------------------
# The cache


def load_pairs(path: str | Path, key: dict) -> tuple[list[Pair] | None, str]:
    """The cached pairs at `path` if they were built under `key`, else (None, why not: a
    phrase that follows the path). A cache is a file anyone can edit or a kill can cut
    short, so everything in it is checked before a pair is used."""
    path = Path(path)
    if not path.exists():
        return None, "holds no cache yet"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return None, f"is not a pair cache (unreadable: {type(e).__name__})"
    except json.JSONDecodeError as e:
        return None, f"is not a pair cache (not JSON, or cut short: {e.msg} at line {e.lineno})"
    problem = cache_problem(data)
    if problem:
        return None, f"is not a pair cache ({problem})"
    saved_key = data["key"]
    differs = sorted(k for k in set(key) | set(saved_key) if key.get(k) != saved_key.get(k))
    if differs:
        return None, "was built with " + ", ".join(f"{k} {saved_key.get(k)!r}, not {key.get(k)!r}" for k in differs)
    return [Pair(**p) for p in data["pairs"]], ""


def cache_problem(data: object) -> str:
    """What makes `data` (a parsed pair cache) unusable, or "" if nothing does."""
    if not isinstance(data, dict) or not isinstance(data.get("key"), dict) or not isinstance(data.get("pairs"), list):
        return "expected an object with a 'key' object and a 'pairs' list"
    if len(data["pairs"]) < 2:
        return f"{len(data['pairs'])} pairs; training needs at least 2"
    fields = {f.name: f.type for f in dataclasses.fields(Pair)}
    for i, pair in enumerate(data["pairs"]):
        if not isinstance(pair, dict) or set(pair) != set(fields):
            return f"pair {i}: expected the fields {', '.join(fields)}"
        for name, value in pair.items():
            if fields[name] == "str" and (not isinstance(value, str) or not value):
                return f"pair {i}: {name} is not a non-empty string"
            if fields[name] == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                            or not math.isfinite(value)):
                return f"pair {i}: {name} is not a finite number"
    return ""


def save_pairs(path: str | Path, key: dict, pairs: list[Pair], counts: PairCounts) -> None:
    """Write atomically, like every file a run writes."""
    data = {"key": key, "counts": asdict(counts), "pairs": [asdict(p) for p in pairs]}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=0))


def no_pairs_error(counts: PairCounts, preference: str, too_long: int = 0, block_size: int = 0) -> UserError:
    """Fewer than two pairs: say why, by reason (no prompt had both kinds of answer, or the
    pairs found did not fit the model's block)."""
    if too_long:
        return UserError(f"too few preference pairs ({preference}): {counts.summary()}, after {too_long:,} were "
                         f"dropped for not fitting block_size {block_size} (prompt and answer together); the model "
                         "writes answers too long for its block: try a model with a larger --block-size")
    return UserError(f"no preference pair found ({preference}): {counts.summary()}; a pair needs a prompt with "
                     "both kinds of answer: try more --samples-per-prompt or --prompts, or another --preference")

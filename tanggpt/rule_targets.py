"""Where a rule names what to write: the characters a rule allows at one place of an answer.

Most rules judge a whole poem (its form, its tones), but two of them decide single
characters, and know which ones would be right: an acrostic's k-th clause must open with the
k-th head, and a rhyme position (the last character of the 4th, 6th, 8th clause) must take a
character of the rhyme group the poem's earlier rhymes set, not one already used. There the
rule is a teacher, not only a judge.

GRPO (rl.py) learns only from the judge: a score for the whole answer, spread over all its
tokens, and only when a sampled answer happened to be right. An acrostic head that is a rare
character is almost never sampled, so the policy is almost never shown it: the acrostic did
not move under GRPO (docs/rl.md). With `--target-weight`, rl.py also asks, at each place a
rule decides in the policy's own answer, for a higher probability of what the rule allows
there (losses.grpo_loss): the policy's own context, the rule's answer. For the rhyme that is
the whole group (losses.set_nll), as align.py's rhyme loss asks on real poems, so any
rhyming character will do.

    Target     what a rule allows at one character: a rhyme group's characters (less those
               used) and/or given characters
    targets    answer_targets(task, input, answer): (character index in the answer, Target)
    labels     place_targets(...): a row labelling where each target's character is predicted
    masks      target_masks(tokenizer, targets): one (vocab,) row of allowed ids per Target
    rows       rhyme_rows(...): align.py's rhyme loss, on real rhyming poems at their rhyme
               positions (what may rhyme there: the group, less the rhymes used, 重韻 a fault)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from data.corpus import Poem
from data.errors import UserError
from data.forms import CLAUSE_TEXT, regular_clauses
from data.instruct import IGNORE, encode_sample, poem_sample
from data.tokenizer import Tokenizer
from tanggpt.prosody import RhymeConstraint, rhyme_demands, rhymes


class Target(NamedTuple):
    groups: tuple[str, ...] = ()  # rhyme groups whose characters are allowed
    chars: str = ""  # characters allowed besides (the acrostic's head)
    excluded: str = ""  # characters not allowed even if in a group (rhymes already used)


def clause_starts(text: str) -> list[int]:
    """The index in `text` of each clause's first character (data.forms.clauses' clauses)."""
    return [m.start() + len(m.group()) - len(m.group().lstrip()) for m in CLAUSE_TEXT.finditer(text)
            if m.group().strip()]


def clause_ends(text: str) -> list[int]:
    """The index in `text` of each clause's last character."""
    return [m.start() + len(m.group().rstrip()) - 1 for m in CLAUSE_TEXT.finditer(text) if m.group().strip()]


def acrostic_targets(answer: str, head: str) -> list[tuple[int, Target]]:
    """The k-th clause's first character must be the head's k-th (for the clauses the answer has)."""
    return [(start, Target(chars=char)) for start, char in zip(clause_starts(answer), head)]


def rhyme_position_targets(poem: str) -> list[tuple[int, Target]]:
    """For a 絕句/律詩, at the last character of the 4th, 6th and 8th clause, a character of the
    groups its earlier rhymes share, less those used (prosody.rhyme_demands: the rhyme rule's own
    demand; for a poem that rhymes, what its rhymes answered). None where the earlier rhymes share
    no group (nothing to rhyme with), or for a poem of no regular shape (which clauses rhyme is
    only defined for those). The first rhyme, the 2nd clause's, answers nothing: it sets the group."""
    lines = regular_clauses(poem)
    if not lines:
        return []
    ends = clause_ends(poem)
    return [(ends[2 * k + 3], Target(groups=tuple(sorted(d.groups)), excluded=d.used))
            for k, d in enumerate(rhyme_demands(lines)) if d.groups]


def answer_targets(task: str, request_input: str, answer: str) -> list[tuple[int, Target]]:
    """Every place of `answer` a rule decides, as (character index in the answer, Target). A
    continuation is judged as the whole poem (the given couplet, a line break, the answer), as
    the rewards judge it; only its answer's places are returned."""
    given = f"{request_input}\n" if task == "continue" else ""
    targets = [(i - len(given), t) for i, t in rhyme_position_targets(given + answer) if i >= len(given)]
    if task == "acrostic":
        targets += acrostic_targets(answer, request_input)
    return sorted(targets)


def place_targets(length: int, first: int, targets: list[tuple[int, Target]], sets: dict[Target, int]
                  ) -> list[int]:
    """A row of `length` set labels (RolloutBatch.target_labels, align's rhyme rows): IGNORE,
    except where a target's character is predicted, the index of its Target in `sets` (added
    there if new). `first` is the position that predicts the answer's first character: the
    label at position p predicts token p + 1, so the answer's character j (one token each, char
    tokenizer) is predicted at first + j."""
    labels = [IGNORE] * length
    for char_index, target in targets:
        labels[first + char_index] = sets.setdefault(target, len(sets))
    return labels


def target_masks(tokenizer: Tokenizer, targets: list[Target], constraint: RhymeConstraint | None = None
                 ) -> torch.Tensor:
    """(len(targets), vocab) bool: the ids each Target allows. Needs the char tokenizer (one id a
    character); a character the vocabulary lacks is left out."""
    constraint = constraint or RhymeConstraint(tokenizer)
    masks = torch.zeros(max(len(targets), 1), tokenizer.vocab_size, dtype=torch.bool)
    for row, target in enumerate(targets):
        if target.groups:
            masks[row] = constraint.mask(target.groups, "cpu")
        masks[row, [tokenizer.stoi[c] for c in target.chars if c in tokenizer.stoi]] = True
        masks[row, [tokenizer.stoi[c] for c in target.excluded if c in tokenizer.stoi]] = False
    return masks


class RhymeRow(NamedTuple):
    inputs: list[int]  # a real poem's instruction sample
    labels: list[int]  # at each rhyme position the index of its rhyme set (a row of the masks), else IGNORE
    response_labels: list[int]  # the poem and end-of-text, for the anchor on real poems


def rhyme_rows(tokenizer: Tokenizer, poems: list[Poem], block_size: int) -> tuple[list[RhymeRow], torch.Tensor]:
    """The rhyming 絕句/律詩 among `poems` as rows for losses.rhyme_group_loss, and the masks of
    their rhyme sets ((sets, vocab) bool: the characters that rhyme at such a position)."""
    try:
        constraint = RhymeConstraint(tokenizer)
    except ValueError as e:
        raise UserError(f"--rhyme-weight: {e}; give --rhyme-weight 0") from None
    sets: dict[Target, int] = {}  # each rhyme set (groups, less the characters already used) -> its mask's row
    rows = []
    for poem in poems:
        lines = regular_clauses(poem.body)
        targets = [(i, t) for i, t in rhyme_position_targets(poem.body) if constraint.mask(t.groups, "cpu").any()] \
            if lines and rhymes(lines) else []
        sample = encode_sample(tokenizer, poem_sample(poem))
        if not targets or len(sample.inputs) > block_size:
            continue
        first = next(p for p, label in enumerate(sample.response_labels) if label != IGNORE)
        rows.append(RhymeRow(sample.inputs, place_targets(len(sample.inputs), first, targets, sets),
                             sample.response_labels))
    return rows, target_masks(tokenizer, list(sets), constraint)

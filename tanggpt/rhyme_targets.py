"""The rhyme loss's rows: real rhyming poems, labelled at their rhyme positions with what may rhyme there.

losses.rhyme_group_loss asks, at the last character of the 4th, 6th and 8th clauses of a
rhyming 絕句/律詩, for the probability of the whole set of characters that would rhyme there:
the rhyme group of the earlier rhymes (rule_targets.rhyme_position_targets), less the characters already
used to rhyme (a repeated rhyme, 重韻, is a fault, and the model's easiest way out). This
module turns poems into those rows and sets; align.py trains on them beside DPO.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from data.corpus import Poem
from data.errors import UserError
from data.instruct import IGNORE, encode_sample, poem_sample
from data.tokenizer import Tokenizer
from data.forms import regular_clauses
from tanggpt.prosody import RhymeConstraint, rhymes
from tanggpt.rule_targets import Target, place_targets, rhyme_position_targets, target_masks


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

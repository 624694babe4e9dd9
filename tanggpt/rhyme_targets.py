"""The rhyme loss's rows: real rhyming poems, labelled at their rhyme positions with what may rhyme there.

losses.rhyme_group_loss asks, at the last character of the 4th, 6th and 8th clauses of a
rhyming 絕句/律詩, for the probability of the whole set of characters that would rhyme there:
the rhyme group of the earlier rhymes (prosody.rhyme_positions), less the characters already
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
from tanggpt.prosody import RhymeConstraint, rhyme_positions


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
    sets: dict[tuple[tuple[str, ...], str], int] = {}  # (rhyme groups, rhyme characters already used) -> index
    rows = []
    for poem in poems:
        targets = [(i, (groups, used)) for i, groups, used in rhyme_positions(poem.body)
                   if constraint.mask(groups, "cpu").any()]
        sample = encode_sample(tokenizer, poem_sample(poem))
        if not targets or len(sample.inputs) > block_size:
            continue
        # The label at position p predicts token p + 1; the response's character j (one token
        # each, char tokenizer) is predicted at position (prompt length - 1) + j.
        first = next(p for p, label in enumerate(sample.response_labels) if label != IGNORE)
        labels = [IGNORE] * len(sample.inputs)
        for char_index, target in targets:
            labels[first + char_index] = sets.setdefault(target, len(sets))
        rows.append(RhymeRow(sample.inputs, labels, sample.response_labels))
    masks = torch.zeros(max(len(sets), 1), tokenizer.vocab_size, dtype=torch.bool)
    for (groups, used), index in sets.items():  # the group, less the characters that already rhymed
        masks[index] = constraint.mask(groups, "cpu")
        masks[index, [tokenizer.stoi[c] for c in used if c in tokenizer.stoi]] = False
    return rows, masks

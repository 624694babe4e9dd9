"""What a generated poem is measured by: did it stop, does it have a regular form (or the
form asked for), is it varied, is it copied, does it hide the acrostic it was asked for.

The shapes themselves (clauses, regular form, the four forms) are data/forms.py's; this
module counts how many answers have them.
"""

from __future__ import annotations

import math
from typing import Iterable

from data.forms import acrostic_head, is_regular_form


def acrostic_hits(poem: str, head: str) -> int:
    """How many of the head's characters open their clause: the i-th clause starts with head[i]."""
    return sum(a == b for a, b in zip(acrostic_head(poem), head))


def follows_acrostic(poem: str, head: str) -> bool:
    """Every clause starts with its character of the head, and there are exactly len(head) clauses."""
    return acrostic_head(poem) == head


def share_of(flags: Iterable[bool]) -> float | None:
    """The share of true flags; None when there are none (nothing of this kind could be asked:
    a folder without two-line poems has no first couplet to continue)."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct character n-grams over all n-grams in the texts: 1.0 = no repetition at all."""
    grams = [t[i : i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_lines(poem: str) -> list[str]:
    """The poem's non-blank text lines (as written, not clauses), stripped."""
    return [line.strip() for line in poem.split("\n") if line.strip()]


def memorised_share(poems: list[str], training_lines: set[str]) -> float:
    """Share of the generated lines that occur verbatim as a line of a training poem."""
    generated = [line for p in poems for line in text_lines(p)]
    return sum(line in training_lines for line in generated) / len(generated) if generated else 0.0


def mean_and_standard_error(values: Iterable[float]) -> tuple[float, float]:
    """Sample mean and its standard error (sample standard deviation / sqrt(n))."""
    values = list(values)
    n = len(values)
    if n < 2:
        raise ValueError(f"need at least 2 values for a standard error, got {n}")
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def generation_figures(poems: list[str], stopped: list[bool], training_lines: set[str] | None = None) -> dict:
    """Stop rate, regular-form rate, mean length (characters), distinct-2 and, given the
    training poems' lines, the memorised share of generated poems.

    A poem that did not end with end-of-text within the limit does not count as stopped.
    """
    if len(poems) != len(stopped) or not poems:
        raise ValueError(f"need one stopped flag per poem and at least one poem, got {len(poems)} and {len(stopped)}")
    n = len(poems)
    figures = {
        "stop_rate": sum(stopped) / n,
        "regular_form_rate": sum(is_regular_form(p) for p in poems) / n,
        "mean_length": sum(len(p) for p in poems) / n,
        "distinct_2": distinct_n(poems, 2),
    }
    if training_lines is not None:
        figures["memorised_lines"] = memorised_share(poems, training_lines)
    return figures

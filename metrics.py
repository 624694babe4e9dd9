"""What a generated poem is measured by: did it stop, and does it have a regular form.

Regular form is the shape of the classical 絕句 and 律詩: every clause 5 characters, or
every clause 7, and an even number of clauses (clauses pair into couplets). Clauses are
the runs of text between punctuation marks and line breaks.
"""

from __future__ import annotations

import re

CLAUSE_BREAK = re.compile(r"[，。？！；：、,.?!;:\n]+")


def clauses(poem: str) -> list[str]:
    """The poem's clauses: text between punctuation and line breaks, blanks dropped."""
    return [c.strip() for c in CLAUSE_BREAK.split(poem) if c.strip()]


def is_regular_form(poem: str) -> bool:
    """Every clause 5 characters, or every clause 7, and an even number (at least 2) of clauses."""
    parts = clauses(poem)
    if len(parts) < 2 or len(parts) % 2:
        return False
    lengths = {len(c) for c in parts}
    return lengths == {5} or lengths == {7}


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct character n-grams over all n-grams in the texts: 1.0 = no repetition at all."""
    grams = [t[i : i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generation_figures(poems: list[str], stopped: list[bool]) -> dict:
    """Stop rate, regular-form rate, mean length (characters) and distinct-2 of generated poems.

    A poem that did not end with end-of-text within the limit does not count as stopped.
    """
    n = len(poems)
    return {
        "stop_rate": sum(stopped) / n,
        "regular_form_rate": sum(is_regular_form(p) for p in poems) / n,
        "mean_length": sum(len(p) for p in poems) / n,
        "distinct_2": distinct_n(poems, 2),
    }

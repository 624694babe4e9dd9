"""Text tables that line up in a terminal when they hold Chinese.

A terminal (and a notebook's output) gives a CJK character two columns and a Latin letter
one, so Python's own padding, f"{label:32s}", which counts characters, leaves every row
with a Chinese label short by one column per character. pad() counts columns instead.
"""

from __future__ import annotations

import unicodedata


def display_width(text: str) -> int:
    """Columns the text takes in a terminal: 2 for a wide or full-width character (漢字, ，), else 1."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int, align: str = "<") -> str:
    """The text padded with spaces to `width` columns: on the right (align "<") or on the left (">").
    A text wider than `width` is returned as it is."""
    if align not in "<>":
        raise ValueError(f"align must be '<' or '>', got {align!r}")
    fill = " " * max(0, width - display_width(text))
    return text + fill if align == "<" else fill + text

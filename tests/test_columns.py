"""tanggpt/columns.py: padding counted in terminal columns, a CJK character two."""

import pytest

from tanggpt.columns import display_width, pad


def test_display_width_counts_wide_characters_twice():
    assert display_width("abc") == 3
    assert display_width("五言絕句") == 8
    assert display_width("form: 七言律詩，") == 6 + 8 + 2  # the full-width comma is wide too
    assert display_width("") == 0


def test_pad_fills_to_columns_on_either_side():
    assert pad("春", 5) == "春   "
    assert pad("春", 5, ">") == "   春"
    assert pad("ab", 5, ">") == "   ab"
    assert pad("五言絕句", 4) == "五言絕句"  # wider than asked: left as it is
    with pytest.raises(ValueError):
        pad("a", 3, "^")

"""Metric functions on hand-made poems."""

from __future__ import annotations

import math

import pytest

from data.forms import acrostic_head, clauses, form_name, is_regular_form
from tanggpt.metrics import (acrostic_hits, distinct_n, follows_acrostic, generation_figures, mean_and_standard_error,
                             memorised_share)

QUATRAIN_5 = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
QUATRAIN_7 = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"
MIXED = "床前明月光，疑是地上霜。\n兩岸猿聲啼不住，輕舟已過萬重山。"


LUSHI_5 = "好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。\n野徑雲俱黑，江船火獨明。\n曉看紅濕處，花重錦官城。"
LUSHI_7 = ("風急天高猿嘯哀，渚清沙白鳥飛回。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
           "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新停濁酒杯。")


@pytest.mark.parametrize("poem, form", [
    (QUATRAIN_5, "五言絕句"), (QUATRAIN_7, "七言絕句"), (LUSHI_5, "五言律詩"), (LUSHI_7, "七言律詩"),
    (MIXED, None), (QUATRAIN_5 + "\n床前明月光，疑是地上霜。", None),  # six clauses: regular, but no form
    ("床前明月光，疑是地上霜。", None), ("一二三四，一二三四。\n一二三四，一二三四。", None), ("", None)])
def test_form_name(poem, form):
    assert form_name(poem) == form


def test_acrostic_checks():
    assert acrostic_head(LUSHI_5) == "好當隨潤野江曉花"
    assert follows_acrostic(QUATRAIN_5, "床疑舉低")
    assert acrostic_hits(QUATRAIN_5, "床疑舉低") == 4
    assert not follows_acrostic(QUATRAIN_5, "床疑舉高") and acrostic_hits(QUATRAIN_5, "床疑舉高") == 3
    assert not follows_acrostic(QUATRAIN_5, "床疑舉低春")  # a clause short: not every head character opens a line
    assert acrostic_hits(QUATRAIN_5, "床疑舉低春") == 4
    assert not follows_acrostic(QUATRAIN_5 + "\n春風。", "床疑舉低")  # a clause too many
    assert acrostic_hits("", "春夏") == 0


def test_clauses_split_on_punctuation_and_lines():
    assert clauses("白日依山盡，黃河入海流。\n欲窮千里目？") == ["白日依山盡", "黃河入海流", "欲窮千里目"]


@pytest.mark.parametrize("poem, regular", [(QUATRAIN_5, True), (QUATRAIN_7, True), (MIXED, False),
                                           ("床前明月光，疑是地上霜。\n舉頭望明月。", False), ("", False)])
def test_regular_form(poem, regular):
    assert is_regular_form(poem) is regular


def test_distinct_2_counts_repeated_bigrams():
    assert distinct_n(["ABAB"]) == pytest.approx(2 / 3)  # AB, BA, AB
    assert distinct_n(["ABCD"]) == 1.0
    assert distinct_n([""]) == 0.0


def test_generation_figures():
    figures = generation_figures([QUATRAIN_5, MIXED, QUATRAIN_7, "春"], [True, True, False, False])
    assert figures["stop_rate"] == 0.5  # a poem without end-of-text does not count as stopped
    assert figures["regular_form_rate"] == 0.5
    assert figures["mean_length"] == pytest.approx((len(QUATRAIN_5) + len(MIXED) + len(QUATRAIN_7) + 1) / 4)


def test_memorised_share_counts_verbatim_training_lines():
    training = {"床前明月光，疑是地上霜。", "白日依山盡，黃河入海流。"}
    # 1 of 2 lines is copied; a near-copy (one character changed) is not.
    assert memorised_share([QUATRAIN_5], training) == 0.5
    assert memorised_share(["床前明月光，疑是地上雪。"], training) == 0.0
    assert memorised_share(["  床前明月光，疑是地上霜。\n\n"], training) == 1.0  # blank lines and spaces ignored
    assert memorised_share([""], training) == 0.0
    figures = generation_figures([QUATRAIN_5, QUATRAIN_7], [True, True], training)
    assert figures["memorised_lines"] == 0.25
    assert "memorised_lines" not in generation_figures([QUATRAIN_5], [True])


def test_mean_and_standard_error():
    mean, se = mean_and_standard_error([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt((1.5**2 + 0.5**2) * 2 / 3 / 4))
    with pytest.raises(ValueError):
        mean_and_standard_error([1.0])


def test_generation_figures_need_one_flag_per_poem():
    with pytest.raises(ValueError):
        generation_figures([QUATRAIN_5], [True, False])
    with pytest.raises(ValueError):
        generation_figures([], [])

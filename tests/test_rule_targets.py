"""Where a rule names what to write (tanggpt/rule_targets.py): the acrostic heads at the clauses'
openings, the rhyme group at the rhyme positions, and the rows and masks RL's loss reads."""

from __future__ import annotations

import torch

from data.instruct import IGNORE, prompt_ids
from data.tokenizer import CharTokenizer
from tanggpt.prosody import RhymeConstraint
from tanggpt.rewards import Reward
from tanggpt.rollouts import Request, Rollout, rollout_rows, rollout_target_rows
from tanggpt.rule_targets import Target, acrostic_targets, answer_targets, target_masks
from tests.test_prosody import CHUN_YE_XI_YU, JING_YE_SI


def test_the_acrostic_asks_each_clause_to_open_with_its_head():
    answer = " 床前明月光，疑是地上霜。\n舉頭望明月"  # a leading space, and one clause fewer than heads
    targets = acrostic_targets(answer, "春夏秋冬")
    assert [(answer[i], t.chars) for i, t in targets] == [("床", "春"), ("疑", "夏"), ("舉", "秋")]


def test_a_poems_targets_are_its_rhyme_positions_and_for_an_acrostic_its_heads():
    targets = answer_targets("acrostic", "床疑舉低", JING_YE_SI)
    assert [(JING_YE_SI[i], t) for i, t in targets] == [
        ("床", Target(chars="床")), ("疑", Target(chars="疑")), ("舉", Target(chars="舉")),
        ("低", Target(chars="低")), ("鄉", Target(groups=("下平聲七陽",), excluded="霜"))]
    assert [JING_YE_SI[i] for i, _ in answer_targets("poem", "靜夜思", JING_YE_SI)] == ["鄉"]
    assert answer_targets("poem", "靜夜思", "床前明月光") == []  # no regular shape: no rhyme positions


def test_a_continuations_rhyme_is_asked_of_the_answer_with_the_given_couplet_before_it():
    given, answer = JING_YE_SI.split("\n")
    targets = answer_targets("continue", given, answer)  # 霜, the given rhyme, sets the group
    assert [(answer[i], t.groups, t.excluded) for i, t in targets] == [("鄉", ("下平聲七陽",), "霜")]


def test_a_targets_mask_allows_its_group_and_characters_less_what_is_excluded():
    tokenizer = CharTokenizer.from_texts([CHUN_YE_XI_YU, JING_YE_SI])
    masks = target_masks(tokenizer, [Target(groups=("下平聲八庚",), excluded="生聲"), Target(chars="床")])
    allowed = [{tokenizer.itos[i] for i in row.nonzero().flatten().tolist()} for row in masks]
    assert {"明", "城", "生", "聲"} & allowed[0] == {"明", "城"} and "鄉" not in allowed[0]
    assert allowed[1] == {"床"}


def test_the_target_rows_label_the_positions_that_predict_the_heads_and_rhymes():
    tokenizer = CharTokenizer.from_texts([JING_YE_SI, "請寫一首藏頭詩"])
    request = Request("acrostic", "請寫一首藏頭詩", "床疑舉低")
    stopped = Rollout(request, tokenizer.encode(JING_YE_SI) + [tokenizer.eot_id], JING_YE_SI, True, Reward(1.0, {}))
    cut = Rollout(request, tokenizer.encode("床前明月光，疑"), "床前明月光，疑", False, Reward(0.2, {}))
    rows, masks = rollout_target_rows(tokenizer, [stopped, cut], RhymeConstraint(tokenizer))
    for (inputs, labels), targets, rollout in zip(rollout_rows(tokenizer, [stopped, cut]), rows, [stopped, cut]):
        assert len(targets) == len(labels)  # laid out as the rollout's own row
        predicted = [tokenizer.itos[labels[p]] for p, t in enumerate(targets) if t != IGNORE]
        expected = "床疑舉低鄉" if rollout.stopped else "床疑"
        assert "".join(predicted) == expected
        assert all(masks[t, labels[p]] for p, t in enumerate(targets) if t != IGNORE)  # each wrote what it asks
    assert masks.shape == (5, tokenizer.vocab_size)  # 床 疑 舉 低, and 七陽 less 霜
    assert len(prompt_ids(tokenizer, request.instruction, request.input)) - 1 == rows[0].index(0)
    unknown = Rollout(request, [tokenizer.unk_id] + tokenizer.encode("疑"), "<unk>疑", False, Reward(0.0, {}))
    assert set(rollout_target_rows(tokenizer, [unknown], RhymeConstraint(tokenizer))[0][0]) == {IGNORE}

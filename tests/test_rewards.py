"""rewards.py on known poems and hand-broken copies of them: each rule gives a real poem 1,
a broken one less, more broken less still, and every value stays in [0, 1]."""

from __future__ import annotations

import pytest

from data.errors import UserError
from data.forms import FORMS, form_name, regular_clauses
from data.tasks import TASKS
from tanggpt.metrics import follows_acrostic
from tanggpt.prosody import keeps_tonal_pattern, rhymes_without_repeats
from tanggpt.rewards import (TASK_RULES, RewardWeights, acrostic_reward, distinct_rhymes_reward, form_reward,
                             no_copy_reward, no_repeat_reward, regular_form_reward, rhyme_reward, stop_reward,
                             task_reward, tonal_reward)

JING_YE_SI = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"  # 李白: 霜 and 鄉 in 下平聲七陽; a 古絕
CHUN_XIAO = "春眠不覺曉，處處聞啼鳥。\n夜來風雨聲，花落知多少。"  # 孟浩然: 鳥 and 少 in 上聲十七篠
DENG_GUAN_QUE_LOU = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"  # 王之渙: rhymes, keeps the tones
CHUN_YE_XI_YU = ("好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無聲。\n"
                 "野徑雲俱黑，江船火獨明。\n曉看紅濕處，花重錦官城。")  # 杜甫, 五言律詩 in 下平聲八庚
DENG_GAO = ("風急天高猿嘯哀，渚清沙白鳥飛回。\n無邊落木蕭蕭下，不盡長江滾滾來。\n"
            "萬里悲秋常作客，百年多病獨登臺。\n艱難苦恨繁霜鬢，潦倒新停濁酒杯。")  # 杜甫, 七言律詩 in 上平聲十灰
ZAO_FA_BAI_DI_CHENG = "朝辭白帝彩雲間，千里江陵一日還。\n兩岸猿聲啼不住，輕舟已過萬重山。"  # 李白, 七言絕句

REAL = {"靜夜思": JING_YE_SI, "春曉": CHUN_XIAO, "登鸛雀樓": DENG_GUAN_QUE_LOU, "春夜喜雨": CHUN_YE_XI_YU,
        "登高": DENG_GAO, "早發白帝城": ZAO_FA_BAI_DI_CHENG}

# Hand-broken copies, one fault each unless named otherwise.
REPEATED_RHYME = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故霜。"  # 霜 rhymes with itself (重韻)
LUSHI_REPEATED_RHYME = CHUN_YE_XI_YU.replace("錦官城", "錦官聲")  # 聲 again at the 8th clause
LUSHI_STRAY_RHYME = CHUN_YE_XI_YU.replace("細無聲", "細無雨")  # 雨 (上聲) at the 4th; 明 and 城 still rhyme with 生
LUSHI_TWO_STRAY_RHYMES = LUSHI_STRAY_RHYME.replace("火獨明", "火獨黑")
MISSING_LINE = "床前明月光，疑是地上霜。\n舉頭望明月。"
WRONG_LENGTH = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉兮。"
TWO_WRONG_LENGTHS = "床前明月光，疑是地上霜兮。\n舉頭望明月，低頭思故鄉兮。"
REPEATED_LINE = "白日依山盡，黃河入海流。\n白日依山盡，更上一層樓。"
REPEATED_COUPLET = "白日依山盡，黃河入海流。\n白日依山盡，黃河入海流。"

BROKEN = [REPEATED_RHYME, LUSHI_REPEATED_RHYME, LUSHI_STRAY_RHYME, LUSHI_TWO_STRAY_RHYMES, MISSING_LINE, WRONG_LENGTH,
          TWO_WRONG_LENGTHS, REPEATED_LINE, REPEATED_COUPLET, "", "春"]


def test_stop():
    assert stop_reward(True) == 1.0 and stop_reward(False) == 0.0


@pytest.mark.parametrize("name", REAL)
def test_a_real_poem_has_its_form_and_only_it(name):
    poem = REAL[name]
    assert regular_form_reward(poem) == 1.0 and form_reward(poem, form_name(poem)) == 1.0
    # Another form: the same clause count, other length scores 0; other count, same length, half.
    length, count = FORMS[form_name(poem)]
    for form, (other_length, other_count) in FORMS.items():
        if form != form_name(poem):
            expected = 0.0 if other_length != length else min(count, other_count) / max(count, other_count)
            assert form_reward(poem, form) == expected


def test_form_credit_falls_with_each_clause_wrong():
    assert form_reward(MISSING_LINE, "五言絕句") == form_reward(WRONG_LENGTH, "五言絕句") == 0.75
    assert form_reward(TWO_WRONG_LENGTHS, "五言絕句") == 0.5
    assert form_reward(JING_YE_SI + "\n" + JING_YE_SI, "五言絕句") == 0.5  # eight clauses where four were asked
    assert form_reward("", "五言絕句") == form_reward("床前明月光", "七言律詩") == 0.0
    # The nearest form, of any kind: a clause missing from a 絕句 is nearer a 絕句 than a 律詩.
    assert regular_form_reward(MISSING_LINE) == 0.75
    with pytest.raises(ValueError, match="unknown form"):
        form_reward(JING_YE_SI, "五言古詩")


def test_acrostic_counts_each_head_against_its_clause():
    assert acrostic_reward(JING_YE_SI, "床疑舉低") == 1.0
    assert acrostic_reward(JING_YE_SI, "床疑舉高") == 0.75  # the wrong head on the last clause
    assert acrostic_reward(JING_YE_SI, "春疑舉高") == 0.5
    assert acrostic_reward(JING_YE_SI, "床疑舉低春") == 0.8  # a clause short of the head
    assert acrostic_reward(JING_YE_SI + "\n春風。", "床疑舉低") == 0.8  # a clause more than the head
    assert acrostic_reward(JING_YE_SI, "舉頭望明") == 0.0  # the heads out of order
    assert acrostic_reward("", "春夏秋冬") == 0.0
    with pytest.raises(ValueError):
        acrostic_reward(JING_YE_SI, "")


@pytest.mark.parametrize("name", REAL)
def test_a_real_poem_rhymes_fully(name):
    assert rhyme_reward(REAL[name]) == 1.0  # 春曉 too: the rule asks one shared group, not a level tone


def test_rhyme_credit():
    assert rhyme_reward(REPEATED_RHYME) == 0.0  # a 絕句 has one rhyme to answer, and repeats it
    # A repeat voids the rule (the policy learned to repeat when it cost one clause) ...
    assert rhyme_reward(LUSHI_REPEATED_RHYME) == 0.0
    # ... or, as before --repeat-voids-rhyme, costs its own clause only.
    assert rhyme_reward(LUSHI_REPEATED_RHYME, repeat_voids=False) == pytest.approx(2 / 3)
    assert rhyme_reward(LUSHI_STRAY_RHYME, repeat_voids=False) == rhyme_reward(LUSHI_STRAY_RHYME)
    # One stray rhyme costs its own clause: the later rhymes still answer 生, the first rhyme.
    assert rhyme_reward(LUSHI_STRAY_RHYME) == pytest.approx(2 / 3)
    assert rhyme_reward(LUSHI_TWO_STRAY_RHYMES) == pytest.approx(1 / 3)
    assert rhyme_reward(JING_YE_SI.replace("故鄉", "故里")) == 0.0  # 里 is not in 七陽
    # No regular shape, no rhyme credit: a clause dropped or lengthened does not make rhyming easier.
    assert rhyme_reward(MISSING_LINE) == rhyme_reward(WRONG_LENGTH) == rhyme_reward("") == 0.0


def test_a_repeated_rhyme_costs_its_share_of_the_distinct_rhymes_rule():
    assert all(distinct_rhymes_reward(poem) == 1.0 for poem in REAL.values())
    assert distinct_rhymes_reward(REPEATED_RHYME) == 0.5  # 霜, 霜: the second of two rhyme positions repeats
    assert distinct_rhymes_reward(LUSHI_REPEATED_RHYME) == 0.75
    assert distinct_rhymes_reward(LUSHI_STRAY_RHYME) == 1.0  # a stray rhyme is the rhyme rule's to count
    assert distinct_rhymes_reward(MISSING_LINE) == distinct_rhymes_reward("") == 0.0
    # Weighted in, a repeat costs more than a miss: the repeated 律詩 now scores below the stray one.
    weights = RewardWeights(distinct_rhymes_weight=1.0)
    repeated = task_reward("poem", LUSHI_REPEATED_RHYME, True, "春夜喜雨", weights=weights).total
    assert repeated < task_reward("poem", LUSHI_STRAY_RHYME, True, "春夜喜雨", weights=weights).total


def test_tonal_credit_per_clause():
    for poem in (DENG_GUAN_QUE_LOU, CHUN_YE_XI_YU, DENG_GAO, ZAO_FA_BAI_DI_CHENG):
        assert tonal_reward(poem) == 1.0
    # The old-style quatrains break the rule in two clauses each: 疑是地上霜 (是, 上 both oblique)
    # and 舉頭望明月 (頭, 明 both level); in 春曉 the second couplet does not link (失粘).
    assert tonal_reward(JING_YE_SI) == tonal_reward(CHUN_XIAO) == 0.5
    # 黃河入山流: the 2nd and 4th characters, 河 and 山, are both level. One clause of four.
    assert tonal_reward(DENG_GUAN_QUE_LOU.replace("入海", "入山")) == 0.75
    assert tonal_reward(MISSING_LINE) == tonal_reward("") == 0.0


def test_no_copy_counts_the_prompt_clauses_written_again():
    given = "床前明月光，疑是地上霜。"
    assert no_copy_reward("舉頭望明月，低頭思故鄉。", given) == 1.0
    assert no_copy_reward("床前明月光，低頭思故鄉。", given) == 0.5
    assert no_copy_reward(given, given) == 0.0
    assert no_copy_reward("床前明月光兮，低頭思故鄉。", given) == 1.0  # only a whole clause is a copy
    assert no_copy_reward(DENG_GUAN_QUE_LOU, "登鸛雀樓") == 1.0
    assert no_copy_reward("登鸛雀樓，" + DENG_GUAN_QUE_LOU, "登鸛雀樓") == pytest.approx(4 / 5)
    assert no_copy_reward("", given) == 0.0  # an empty answer earns nothing, here as everywhere


def test_no_repeat_counts_each_later_copy():
    assert no_repeat_reward(DENG_GUAN_QUE_LOU) == 1.0
    assert no_repeat_reward(REPEATED_LINE) == 0.75
    assert no_repeat_reward(REPEATED_COUPLET) == 0.5
    assert no_repeat_reward("春，春，春，春。") == 0.25
    assert no_repeat_reward("") == 0.0


@pytest.mark.parametrize("poem", [*REAL.values(), *BROKEN])
def test_every_rule_stays_in_0_1_and_gives_1_exactly_when_the_check_passes(poem):
    """Full credit is the all-or-nothing check of the rule's home module, never more lenient."""
    lines = regular_clauses(poem)
    values = {"regular_form": regular_form_reward(poem), "rhyme": rhyme_reward(poem), "tonal": tonal_reward(poem),
              "distinct_rhymes": distinct_rhymes_reward(poem),
              "no_repeat": no_repeat_reward(poem), "no_copy": no_copy_reward(poem, "床前明月光"),
              **{form: form_reward(poem, form) for form in FORMS},
              "acrostic": acrostic_reward(poem, "床疑舉低")}
    assert all(0.0 <= v <= 1.0 for v in values.values()), values
    assert (values["regular_form"] == 1.0) == (lines is not None)
    assert all((values[form] == 1.0) == (form_name(poem) == form) for form in FORMS)
    assert (values["rhyme"] == 1.0) == (lines is not None and rhymes_without_repeats(lines))
    assert (values["tonal"] == 1.0) == (lines is not None and keeps_tonal_pattern(lines))
    ends = [clause[-1] for clause in lines[1::2]] if lines else []
    assert (values["distinct_rhymes"] == 1.0) == (lines is not None and len(set(ends)) == len(ends))
    assert (values["acrostic"] == 1.0) == follows_acrostic(poem, "床疑舉低")


# -----------------------------------------------------------------------------
# A task's reward


def test_each_task_is_judged_by_its_rules():
    for task, rules in TASK_RULES.items():
        form = "五言絕句" if task == "form" else ""
        reward = task_reward(task, DENG_GUAN_QUE_LOU, True, "白日", form)
        assert set(reward.rules) == set(rules)
    assert {"form"} == set(TASK_RULES["form"]) - set(TASK_RULES["poem"])
    assert {"acrostic"} == set(TASK_RULES["acrostic"]) - set(TASK_RULES["poem"])
    with pytest.raises(ValueError, match="no rule judges"):
        task_reward("title", "靜夜思", True, JING_YE_SI)
    with pytest.raises(ValueError, match="form task"):
        task_reward("form", JING_YE_SI, True, "靜夜思")
    with pytest.raises(ValueError, match="form task"):
        task_reward("poem", JING_YE_SI, True, "靜夜思", "五言絕句")


def test_the_total_is_the_weighted_mean_of_the_rules():
    weights = RewardWeights()
    reward = task_reward("form", REPEATED_LINE, False, "登鸛雀樓", "七言絕句", weights)
    assert reward.rules["stop"] == 0.0 and reward.rules["form"] == 0.0 and reward.rules["no_repeat"] == 0.75
    expected = (sum(weights.weight(rule) * value for rule, value in reward.rules.items())
                / sum(weights.weight(rule) for rule in reward.rules))
    assert reward.total == pytest.approx(expected) and 0.0 < reward.total < 1.0
    # A weight of 0 leaves its rule out of the total, not out of the log.
    only_form = RewardWeights(**{f"{rule}_weight": 0.0 for rule in TASK_RULES["form"] if rule != "form"})
    reward = task_reward("form", DENG_GUAN_QUE_LOU, False, "登鸛雀樓", "五言律詩", only_form)
    assert reward.total == 0.5 and reward.rules["stop"] == 0.0


def test_the_repeat_switch_reaches_the_task_reward():
    voided = task_reward("poem", LUSHI_REPEATED_RHYME, True, "春夜喜雨")
    counted = task_reward("poem", LUSHI_REPEATED_RHYME, True, "春夜喜雨", weights=RewardWeights(repeat_voids_rhyme=False))
    assert voided.rules["rhyme"] == 0.0 and counted.rules["rhyme"] == pytest.approx(2 / 3)
    assert voided.total < counted.total


def test_real_answers_score_1_and_each_fault_costs():
    for task in ("poem", "form", "acrostic"):
        head = "白黃欲更" if task == "acrostic" else "登鸛雀樓"
        form = "五言絕句" if task == "form" else ""
        assert task_reward(task, DENG_GUAN_QUE_LOU, True, head, form).total == 1.0
        faults = [task_reward(task, DENG_GUAN_QUE_LOU, False, head, form),  # ran to the length limit
                  task_reward(task, REPEATED_LINE, True, head, form),
                  task_reward(task, "白日依山盡，黃河入海流。", True, head, form)]  # half a 絕句
        assert all(0.0 < f.total < 1.0 for f in faults)
    # The instruction's own demand weighs most: the form asked for, missed, costs more than a
    # line repeated, or than running to the limit.
    wrong_form = task_reward("form", DENG_GUAN_QUE_LOU, True, "登鸛雀樓", "七言絕句").total
    assert wrong_form < task_reward("form", REPEATED_LINE, True, "登鸛雀樓", "五言絕句").total
    assert wrong_form < task_reward("form", DENG_GUAN_QUE_LOU, False, "登鸛雀樓", "五言絕句").total


def test_a_group_of_flawed_answers_scores_apart():
    """What partial credit is for: GRPO learns from the differences within a group, and these
    answers, none of them a full 律詩 that rhymes, each score differently, the fewer faults the
    higher."""
    answers = [CHUN_YE_XI_YU, LUSHI_STRAY_RHYME, LUSHI_TWO_STRAY_RHYMES,
               "好雨知時節，當春乃發生。\n隨風潛入夜，潤物細無雨。\n野徑雲俱黑，江船火獨黑。",  # and 6 clauses
               "好雨知時節，當春乃發生。"]
    totals = [task_reward("form", a, True, "春夜喜雨", "五言律詩").total for a in answers]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    # Pass/fail would tell only the first answer from the rest.
    passes = [form_name(a) == "五言律詩" and rhymes_without_repeats(regular_clauses(a)) for a in answers]
    assert passes == [True, False, False, False, False]


def test_a_continuation_is_judged_with_its_given_couplet():
    given = "床前明月光，疑是地上霜。"
    right = task_reward("continue", "舉頭望明月，低頭思故鄉。", True, given)
    assert right.rules["regular_form"] == 1.0 and right.rules["rhyme"] == 1.0 and right.rules["no_copy"] == 1.0
    # Rhyme is judged against the given rhyme 霜: an answer rhyming in its own group does not rhyme.
    assert task_reward("continue", "舉頭望明月，低頭思故里。", True, given).rules["rhyme"] == 0.0
    copied = task_reward("continue", given, True, given)  # the given couplet written back
    assert copied.rules["no_copy"] == 0.0 and copied.rules["no_repeat"] == 1.0  # counted once, as a copy
    assert copied.rules["rhyme"] == 0.0 and copied.total < right.total
    # The answer alone is two clauses: with the given couplet, a 絕句.
    assert regular_form_reward("舉頭望明月，低頭思故鄉。") == 0.5


def test_real_poems_score_near_the_top_as_their_own_answers(splits):
    """Each regular finetune-val poem, as the answer to its own sample of each task: the rules
    fit real Tang verse (a rule most real poems fail would teach the model away from them)."""
    poems = [p for p in splits["finetune_val"] if regular_clauses(p.body)]
    assert len(poems) > 300
    for task in TASK_RULES:
        samples = [s for s in (TASKS[task].sample(p, TASKS[task].phrasings[0]) for p in poems) if s is not None]
        rewards = [task_reward(task, s.response, True, s.input, form_name(s.response) if task == "form" else "")
                   for s in samples]
        assert sum(r.total for r in rewards) / len(rewards) > 0.9
        for rule in ("regular_form", "no_copy", "no_repeat", *TASK_RULES[task][len(TASK_RULES["poem"]):]):
            assert sum(r.rules[rule] == 1.0 for r in rewards) / len(rewards) > 0.98, (task, rule)


def test_the_weights_are_checked():
    RewardWeights().validate()
    with pytest.raises(UserError, match="--tonal-weight must not be negative"):
        RewardWeights(tonal_weight=-1.0).validate()
    poem_rules_off = RewardWeights(**{f"{rule}_weight": 0.0 for rule in TASK_RULES["poem"]})
    poem_rules_off.validate(("form", "acrostic"))  # those tasks still have their own rule
    with pytest.raises(UserError, match="poem task's rules all weigh 0"):
        poem_rules_off.validate(("poem",))

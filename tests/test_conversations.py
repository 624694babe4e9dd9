"""Conversations from the corpus: in the template's order, every assistant turn a real text,
follow-ups that refer to the answer before, system rules the tuning keep, held-out phrasings
never trained on, the same conversations for the same (seed, epoch), and each within the block."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from data.chat import check_conversation, render_ids
from data.conversations import FOLLOW_UPS, OPENING, SYSTEM_PROMPTS, ConversationMaker, ConversationMixture, request_text
from data.forms import FORMS, acrostic_head, clauses, form_name
from data.instruct import IGNORE
from data.tasks import DEFAULT_TASKS, TASKS, TaskMixture, instructions, parse_tasks, tuning_poems

BLOCK_SIZE = 128


@pytest.fixture(scope="module")
def tuning(splits):
    return tuning_poems(splits)[0][:3000]


@pytest.fixture(scope="module")
def chat_tokenizer(char_tokenizer):
    return char_tokenizer.with_chat_markers()


@pytest.fixture(scope="module")
def mixture(tuning, chat_tokenizer):
    return ConversationMixture(tuning, parse_tasks(DEFAULT_TASKS), chat_tokenizer, BLOCK_SIZE, seed=7)


@pytest.fixture(scope="module")
def epoch0(mixture):
    return mixture.conversations(0)


def kind_of(text: str) -> str:
    """Which follow-up or task a user turn asks (by its phrasing)."""
    instruction = text.split("\n")[0]
    for follow in (*FOLLOW_UPS.values(), OPENING):
        if instruction in {t.format(form=f) for t in follow.phrasings + follow.held_out for f in FORMS}:
            return follow.name
    return next(name for name, task in TASKS.items() for held in (False, True)
                if instruction in instructions(task, held))


def test_each_conversation_keeps_the_template_and_fits(epoch0, mixture, chat_tokenizer):
    # A poem opens a conversation when one of its tasks fits the block, as in the instruction format's mixture.
    opened = len(TaskMixture(mixture.maker.poems, parse_tasks(DEFAULT_TASKS), chat_tokenizer, BLOCK_SIZE))
    assert 0.99 * opened <= len(epoch0) <= len(mixture.maker.poems)
    for conversation in epoch0:
        check_conversation(conversation)
        assert conversation[-1]["role"] == "assistant"
        assert len(render_ids(chat_tokenizer, conversation)) - 1 <= BLOCK_SIZE
    turns = Counter(sum(m["role"] == "user" for m in c) for c in epoch0)
    assert set(turns) == {1, 2, 3}
    assert 0.3 < sum(c[0]["role"] == "system" for c in epoch0) / len(epoch0) < 0.6


def test_every_assistant_turn_is_a_real_text(epoch0, tuning):
    bodies = {p.body for p in tuning}
    rests = {"\n".join(p.lines[1:]) for p in tuning}
    titles = {p.title for p in tuning}
    openings = {p.lines[0] for p in tuning}
    for conversation in epoch0:
        for message in conversation:
            if message["role"] == "assistant":
                assert message["content"] in bodies | rests | titles | openings | set(FORMS), message["content"]


def test_follow_ups_refer_to_the_answer_before(epoch0, tuning):
    title_of = {p.body: p.title for p in tuning}
    kinds = Counter()
    for conversation in epoch0:
        chat = [m for m in conversation if m["role"] != "system"]
        about = None  # the poem the assistant last wrote: what "this poem" means
        for i in range(0, len(chat), 2):
            asked, answer = chat[i]["content"], chat[i + 1]["content"]
            said = "".join(m["content"] for m in chat[:i + 1])
            kind = kind_of(asked)
            if i:
                kinds[kind if kind in FOLLOW_UPS else "next"] += 1
            if kind == "title_it":  # the real title of the poem just written, which nothing before named
                named = {m["content"].split("\n", 1)[-1] for m in chat[:i]} | {m["content"] for m in chat[:i]}
                assert answer == title_of[about] and answer not in named
            elif kind == "form_of_it":
                assert answer in FORMS and {len(c) for c in clauses(about)} == {FORMS[answer][0]}
                assert len(clauses(about)) == FORMS[answer][1]
            elif kind.startswith("same_title"):  # another poem of a title the conversation has named
                title = title_of[about] if about else chat[i - 1]["content"]  # after a title request, its answer
                assert answer != about and title_of[answer] == title and title in said
                if kind == "same_title_form":
                    assert asked.endswith(form_name(answer)) or form_name(answer) in asked
                if kind == "same_title_acrostic":
                    assert asked.split("\n")[1] == acrostic_head(answer)
                about = answer
            elif kind == "opening":  # a poem's first line, its rest asked next
                assert chat[i + 2]["content"] in FOLLOW_UPS["continue_it"].phrasings
                about = None
            elif kind == "continue_it":
                about = chat[i - 1]["content"] + "\n" + answer
                assert about in title_of
            elif kind == "continue":
                about = asked.split("\n", 1)[1] + "\n" + answer
            elif kind != "title":
                about = answer
            else:
                about = None
    assert set(kinds) == set(FOLLOW_UPS) and min(kinds.values()) >= 5  # the same_title kinds are rare


def test_a_system_rule_is_kept_by_every_poem_written(epoch0):
    rules = Counter()
    for conversation in epoch0:
        if conversation[0]["role"] != "system":
            continue
        rule = next(s for s in SYSTEM_PROMPTS.values() if conversation[0]["content"] in s.phrasings)
        rules[rule.name] += 1
        for message in conversation[1:]:
            if message["role"] == "assistant" and len(clauses(message["content"])) > 1:
                assert rule.keeps(message["content"]), (rule.name, message["content"])
    assert set(rules) == set(SYSTEM_PROMPTS)


def test_every_phrasing_is_spelled_by_the_corpus_vocabulary(char_tokenizer):
    """The char tokenizer knows the corpus and the tasks' phrasings: a conversation's phrasing
    with a character outside them would reach the model as <unk>."""
    texts = [t.format(form=form) for f in (*FOLLOW_UPS.values(), OPENING) for t in f.phrasings + f.held_out
             for form in FORMS] + [t for s in SYSTEM_PROMPTS.values() for t in s.phrasings + s.held_out]
    unknown = [text for text in texts if char_tokenizer.unk_id in char_tokenizer.encode(text)]
    assert unknown == []


def test_no_phrasing_asks_two_things():
    kinds = [(name, f.phrasings + f.held_out) for name, f in {**FOLLOW_UPS, "opening": OPENING}.items()] + \
        [(name, s.phrasings + s.held_out) for name, s in SYSTEM_PROMPTS.items()] + \
        [(name, tuple(instructions(t)) + tuple(instructions(t, True))) for name, t in TASKS.items()]
    seen = Counter(text for _, texts in kinds for text in set(texts))
    assert [text for text, n in seen.items() if n > 1] == []


def test_held_out_phrasings_are_never_trained_and_the_held_out_maker_uses_only_them(epoch0, tuning):
    held = {t.format(form=form) for f in (*FOLLOW_UPS.values(), OPENING) for t in f.held_out for form in FORMS} | \
        {t for s in SYSTEM_PROMPTS.values() for t in s.held_out} | \
        {t for task in TASKS.values() for t in instructions(task, held_out=True)}
    said = {m["content"].split("\n")[0] for c in epoch0 for m in c if m["role"] != "assistant"}
    assert not said & held
    maker = ConversationMaker(tuning, parse_tasks(DEFAULT_TASKS), held_out=True)
    rng = random.Random(0)
    asked = [maker.conversation(rng, poem, lambda messages: True) for poem in tuning[:300]]
    said = {m["content"].split("\n")[0] for c in asked if c for m in c if m["role"] != "assistant"}
    assert said and said <= held


def test_the_same_seed_and_epoch_draw_the_same_conversations(mixture, epoch0, tuning, chat_tokenizer):
    assert mixture.conversations(1) != epoch0
    assert mixture.conversations(0) == epoch0  # drawn again: the mixture keeps the last epoch only
    again = ConversationMixture(tuning, parse_tasks(DEFAULT_TASKS), chat_tokenizer, BLOCK_SIZE, seed=7)
    assert again.conversations(0) == epoch0


def test_rows_carry_the_mask_asked_for(tuning, chat_tokenizer):
    every = ConversationMixture(tuning[:200], parse_tasks(DEFAULT_TASKS), chat_tokenizer, BLOCK_SIZE, "assistant", 1)
    last = ConversationMixture(tuning[:200], parse_tasks(DEFAULT_TASKS), chat_tokenizer, BLOCK_SIZE, "last", 1)
    assert [r.inputs for r in every.rows(0)] == [r.inputs for r in last.rows(0)]
    labelled = [sum(x != IGNORE for x in r.labels) for r in every.rows(0)]
    labelled_last = [sum(x != IGNORE for x in r.labels) for r in last.rows(0)]
    assert all(a >= b for a, b in zip(labelled, labelled_last)) and sum(labelled) > sum(labelled_last)


def test_a_request_is_the_instruction_then_its_input():
    assert request_text("請用以下題目寫一首詩", "春夜") == "請用以下題目寫一首詩\n春夜"

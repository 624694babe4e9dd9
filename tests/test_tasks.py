"""data/tasks.py: each task's sample on a hand-made poem, held-out phrasings kept out of
training, the mixture as a pure function of (seed, step), and --tasks book as the book's run."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from data.corpus import Poem, pretrain_text
from data.errors import UserError
from data.forms import is_regular_form
from data.instruct import IGNORE, INSTRUCTION, EpochBatches, Sample, encode_sample, encode_samples, poem_sample, sample_length
from data.tasks import TASKS, MixedTask, TaskMixture, instructions, parse_tasks, task_instruction

# 杜甫《春夜喜雨》, a 五言律詩, stored a couplet per line as the corpus does.
SPRING_RAIN = Poem("春夜喜雨", ["好雨知時節，當春乃發生。", "隨風潛入夜，潤物細無聲。",
                                "野徑雲俱黑，江船火獨明。", "曉看紅濕處，花重錦官城。"])
BODY = SPRING_RAIN.body


def labelled_text(tokenizer, sample) -> str:
    """The text the loss is taken on: the labelled positions' targets, end-of-text spelled <EOT>."""
    encoded = encode_sample(tokenizer, sample)
    ids = [t for t in encoded.labels if t != IGNORE]
    assert ids[-1] == tokenizer.eot_id
    prompt = [t for t, label in zip(encoded.inputs, encoded.labels) if label == IGNORE]
    assert tokenizer.decode(prompt[1:]).endswith(sample.input)  # the prompt ends with the input, before <RES>
    return tokenizer.decode(ids[:-1]) + "<EOT>"


@pytest.mark.parametrize("task, instruction, input, response", [
    ("poem", INSTRUCTION, "春夜喜雨", BODY),
    ("form", "請用以下題目寫一首五言律詩", "春夜喜雨", BODY),
    ("acrostic", TASKS["acrostic"].phrasings[0], "好當隨潤野江曉花", BODY),
    ("continue", TASKS["continue"].phrasings[0], "好雨知時節，當春乃發生。", "\n".join(SPRING_RAIN.lines[1:])),
    ("title", TASKS["title"].phrasings[0], BODY, "春夜喜雨"),
])
def test_each_task_builds_its_sample_and_labels_only_the_response(char_tokenizer, task, instruction, input, response):
    sample = TASKS[task].sample(SPRING_RAIN, TASKS[task].phrasings[0])
    assert (sample.instruction, sample.input, sample.response) == (instruction, input, response)
    assert labelled_text(char_tokenizer, sample) == response + "<EOT>"


def test_poems_a_task_cannot_use_are_left_out():
    six_clauses = Poem("t", ["一二三四五，一二三四五。", "一二三四五，一二三四五。", "一二三四五，一二三四五。"])
    assert TASKS["form"].sample(six_clauses, TASKS["form"].phrasings[0]) is None  # not a 絕句 or 律詩
    assert TASKS["acrostic"].sample(six_clauses, "x").input == "一一一一一一"
    irregular = Poem("t", ["一二三四五，一二三四五六。", "一二三四五，一二三四五。"])
    assert TASKS["acrostic"].sample(irregular, "x") is None
    one_line = Poem("t", ["一二三四五，一二三四五，一二三四五，一二三四五。"])
    assert TASKS["continue"].sample(one_line, "x") is None  # its first line is not one couplet
    assert TASKS["continue"].sample(Poem("t", ["一二三四五，一二三四五。"]), "x") is None  # nothing to continue


def test_every_task_has_several_training_phrasings_and_a_held_out_one_it_never_trains_on(splits, char_tokenizer):
    held_out = {text for task in TASKS.values() for text in instructions(task, held_out=True)}
    trained = {text for task in TASKS.values() for text in instructions(task)}
    assert all(len(task.phrasings) >= 3 and task.held_out for task in TASKS.values())
    assert not held_out & trained
    poems = [p for p in splits["finetune_val"] if is_regular_form(p.body)]
    mixture = TaskMixture(poems, parse_tasks("all"), char_tokenizer, 128, seed=0)
    seen = {sample.instruction for epoch in range(3) for _, sample in mixture.draws(epoch)}
    assert seen == trained  # every training phrasing (each form filled in) is drawn, no held-out one
    # Every phrasing is spelled with characters the corpus has, so a char tokenizer fitted to
    # the corpus alone (an old checkpoint's) never turns an instruction into <unk>.
    corpus_chars = set(pretrain_text(splits["finetune_train"] + splits["pretrain_train"]))
    assert set("".join(held_out | trained)) <= corpus_chars


def test_the_mixture_is_a_pure_function_of_seed_and_step(splits, char_tokenizer):
    poems = [p for p in splits["finetune_val"] if is_regular_form(p.body)]
    first = TaskMixture(poems, parse_tasks("all"), char_tokenizer, 128, seed=7)
    again = TaskMixture(poems, parse_tasks("all"), char_tokenizer, 128, seed=7)  # a resumed run builds it anew
    batches = EpochBatches(first.rows, 8, seed=7)
    resumed = EpochBatches(again.rows, 8, seed=7)
    late = 3 * batches.steps_per_epoch + 2
    for a, b in zip(batches.batch(late), resumed.batch(late)):  # asked straight away, without earlier steps
        assert torch.equal(a, b)
    assert first.draws(0) != first.draws(1)  # a poem's task is drawn anew each epoch
    assert first.draws(0) != TaskMixture(poems, parse_tasks("all"), char_tokenizer, 128, seed=8).draws(0)
    counts = {name for name, _ in first.draws(0)}
    assert counts == set(TASKS)


def test_tasks_book_reproduces_the_single_task_rows_and_batches(splits, char_tokenizer):
    poems = [p for p in splits["finetune_val"] if is_regular_form(p.body)]
    rows, dropped = encode_samples(char_tokenizer, [poem_sample(p) for p in poems], 64)
    mixture = TaskMixture(poems, parse_tasks("book"), char_tokenizer, 64, seed=3)
    assert mixture.rows(0) == rows and mixture.rows(5) == rows and mixture.dropped == dropped > 0
    single, mixed = EpochBatches(rows, 4, seed=3), EpochBatches(mixture.rows, 4, seed=3)
    for step in (0, 1, single.steps_per_epoch + 1):
        assert all(torch.equal(a, b) for a, b in zip(single.batch(step), mixed.batch(step)))


def test_samples_that_do_not_fit_the_block_drop_the_task_not_the_poem(char_tokenizer):
    long_title = Poem("長" * 40, SPRING_RAIN.lines)
    mixture = TaskMixture([long_title], parse_tasks("all"), char_tokenizer, 90)
    (poem, fitting), = mixture.items
    assert "acrostic" in fitting and "poem" not in fitting  # the title makes its title -> poem samples too long
    assert all(len(row.inputs) <= 90 for epoch in range(5) for row in mixture.rows(epoch))
    assert TaskMixture([long_title], parse_tasks("poem"), char_tokenizer, 90).dropped == 1


def test_parse_tasks():
    assert parse_tasks("book") == {"poem": MixedTask(1.0, (INSTRUCTION,))}
    assert parse_tasks("all") == {name: MixedTask(1.0, task.phrasings) for name, task in TASKS.items()}
    assert {name: t.weight for name, t in parse_tasks("title, acrostic:2.5").items()} == {"title": 1, "acrostic": 2.5}
    with pytest.raises(UserError, match="--tasks: unknown task rhymes; give all, book, or"):
        parse_tasks("poem,rhymes")
    for bad in ("acrostic:0", "acrostic:x", "acrostic:-1", "acrostic:inf", "acrostic:nan"):
        with pytest.raises(UserError, match="--tasks: the weight of acrostic must be a positive number"):
            parse_tasks(bad)
    with pytest.raises(UserError, match="--tasks: no task given"):
        parse_tasks(" , ")


def test_weights_set_how_often_a_task_is_drawn(splits, char_tokenizer):
    poems = [p for p in splits["finetune_val"] if is_regular_form(p.body)]
    mixture = TaskMixture(poems, parse_tasks("poem,acrostic:3"), char_tokenizer, 128)
    counts = Counter(name for name, _ in mixture.draws(0))
    assert counts["poem"] + counts["acrostic"] == len(mixture)
    assert 2.4 < counts["acrostic"] / counts["poem"] < 3.6


def test_task_instruction_fills_the_form_and_picks_the_phrasing():
    assert task_instruction("poem") == INSTRUCTION
    assert task_instruction("form", "七言絕句") == "請用以下題目寫一首七言絕句"
    assert task_instruction("form", "七言絕句", held_out=True) == "試以此題賦七言絕句一首"
    count = len(TASKS["acrostic"].phrasings)
    assert task_instruction("acrostic", phrasing=count + 1) == TASKS["acrostic"].phrasings[1]  # taken in turn


def test_sample_length_is_the_encoded_length(char_tokenizer):
    """A sample's fit is judged from its parts' lengths (data/instruct.py), before encoding it."""
    for sample in (Sample("請用以下題目寫一首詩", "春夜喜雨", "好雨知時節，當春乃發生。"), Sample("續", "", "一")):
        parts = [len(char_tokenizer.encode(t)) for t in (sample.instruction, sample.input, sample.response)]
        assert sample_length(*parts) == len(encode_sample(char_tokenizer, sample).inputs)

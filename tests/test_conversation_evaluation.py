"""evaluate.py on a chat model: each follow-up asked in conversations that leave room for its
answer, judged by its own check, seen and held-out phrasings apart; the title_it gain paired
so a long title cancels out; the table beside a single-turn model's figures for the same tasks."""

from __future__ import annotations

import json

import pytest
import torch

import evaluate
from data.chat import render_ids
from data.conversations import FOLLOW_UPS, OPENING, SYSTEM_PROMPTS
from data.forms import FORMS, clauses, form_name
from data.tasks import TASKS, instructions
from tanggpt import conversation_evaluation as ce
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tanggpt.device import setup_runtime
from tanggpt.generation import SamplingConfig

REQUESTS = {text: name for name in ("poem", "form") for held in (False, True)
            for text in instructions(TASKS[name], held)}


def follow_up_of(text: str) -> tuple[str, bool]:
    """Which follow-up (or first request) a user's text is, and whether in its held-out phrasing."""
    first_line = text.split("\n")[0]
    for spec in [*FOLLOW_UPS.values(), OPENING]:
        for held, texts in ((False, spec.phrasings), (True, spec.held_out)):
            for template in texts:
                if first_line in [template.format(form=form) for form in FORMS] + [template]:
                    return spec.name, held
    for held in (False, True):
        if first_line in instructions(TASKS["poem"], held):
            return "poem", held
        if first_line in instructions(TASKS["form"], held):
            return "form", held
    raise AssertionError(f"asked something no follow-up phrases: {text!r}")


def shaped(length: int, count: int, first: str = "一", second: str = "二", heads: str = "") -> str:
    """A poem of `count` clauses of `length` characters (the clauses opening with `heads`, if given)."""
    clause = [(heads[i] if heads else (first if i % 2 == 0 else second)) + (first if i % 2 == 0 else second)
              * (length - 1) for i in range(count)]
    return "\n".join(f"{clause[i]}，{clause[i + 1]}。" for i in range(0, count, 2))


def perfect(conversation: list[dict]) -> str:
    """What a model that follows every request answers."""
    text = conversation[-1]["content"]
    kind, _ = follow_up_of(text)
    rule = conversation[0]["content"] if conversation[0]["role"] == "system" else ""
    length = 7 if "七" in rule else 5
    asked_form = next((f for f in FORMS if f in text), None)
    before = [m["content"] for m in conversation if m["role"] == "assistant"]
    if kind == "poem":
        return shaped(length, 4)
    if kind in ("form", "same_title_form"):
        return shaped(*FORMS[asked_form], "五", "六")
    if kind == "form_of_it":
        return form_name(before[-1])
    if kind == "same_title":
        return shaped(5, 4, "三", "四")
    if kind == "same_title_acrostic":
        heads = text.split("\n")[1]
        return shaped(7, len(heads), "三", "四", heads)
    if kind == "opening":
        return "一二三四五，六七八九十。"
    if kind == "continue_it":
        return shaped(len(clauses(before[-1])[0]), 6, "三", "四")
    raise AssertionError(kind)


def scripted(monkeypatch, answer) -> list[list[dict]]:
    """Make the chat model's answers answer(conversation), each stopped; return what was asked."""
    asked = []

    def fake(model, tokenizer, conversations, runtime, *args, **kwargs):
        asked.extend(conversations)
        return [(answer(c), True) for c in conversations]

    monkeypatch.setattr(ce, "answer_conversations", fake)
    return asked


@pytest.fixture(scope="module")
def chat_model(tiny_chat):
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_chat))
    return model.eval(), tokenizer


def figures_of(chat_model, splits, n: int = 4) -> dict:
    model, tokenizer = chat_model
    return ce.conversation_figures(model, model, tokenizer, splits["finetune_val"], SamplingConfig(max_new_tokens=4),
                                   n, 8, setup_runtime("cpu", "float32"))


def test_each_follow_up_is_judged_by_its_own_check(monkeypatch, chat_model, splits):
    asked = scripted(monkeypatch, perfect)
    figures = figures_of(chat_model, splits)
    _, tokenizer = chat_model
    block_size = chat_model[0].config.block_size
    for kind in ("seen", "held_out"):
        f = figures[kind]
        for key, _, _, _ in ce.CONVERSATION_ROWS:
            if key in ("title_it_gain", "no_system_seven"):
                continue
            assert f[key] == 1.0, (kind, key)
        assert f["no_system_seven"] == 0.0  # the first answers, unasked, are 五言
        asked_counts = {k: v for k, v in f.items() if k.startswith("asked ")}
        assert asked_counts["asked first"] == 3 * 4 and all(0 < v <= 4 for k, v in asked_counts.items()
                                                              if k != "asked first")
    # Every conversation asked leaves room for its answer, and its phrasings are of one kind.
    for conversation in asked:
        kinds = {follow_up_of(m["content"])[1] for m in conversation if m["role"] == "user"}
        assert len(kinds) == 1
        assert len(render_ids(tokenizer, conversation, add_generation_prompt=True)) < block_size
        if conversation[0]["role"] == "system":
            rule = next(r for r in SYSTEM_PROMPTS.values()
                        if conversation[0]["content"] in r.phrasings + r.held_out)
            assert (conversation[0]["content"] in rule.held_out) == kinds.pop()


def test_a_model_that_answers_the_first_request_again_fails_the_follow_ups(monkeypatch, chat_model, splits):
    def first_again(conversation: list[dict]) -> str:
        return shaped(5, 4)

    scripted(monkeypatch, first_again)
    f = figures_of(chat_model, splits)["held_out"]
    assert f["form_of_it"] == f["same_title_new"] == f["same_title_acrostic"] == f["system_seven"] == 0.0
    assert f["first_regular"] == f["system_five"] == 1.0
    for kind in ("same_title_form", "next"):  # right only where 五言絕句 was asked
        mix = f[f"forms {kind}"]
        assert f["same_title_form" if kind == "same_title_form" else "next_form"] == \
            mix.get("五言絕句", 0) / sum(mix.values())
    assert f["opening_couplet"] == 0.0 and f["continue_it_stop"] is None  # no couplet: no rest to ask for


def test_the_title_it_gain_pairs_each_title_as_its_poems_and_anothers(monkeypatch, chat_model, splits):
    """A model whose loss is the title's length alone has gain 0: every title is counted once as
    its own poem's and once as another's. A title-reading model would gain; this one cannot."""
    def length_only(model, rows, pad_id, batch_size, runtime):
        counts = torch.tensor([float(sum(label != -100 for label in labels)) for _, labels in rows])
        return counts, counts.long()

    monkeypatch.setattr(ce, "labelled_nll", length_only)
    model, tokenizer = chat_model
    figures = ce.title_it_figures(model, tokenizer, splits["finetune_val"], 6, False, 8, 1337,
                                  setup_runtime("cpu", "float32"))
    assert figures["asked title_it"] >= 4 and figures["title_it_gain"] == pytest.approx(0.0, abs=1e-9)


def test_poem_room_is_a_real_poems_length_with_its_end(chat_model):
    _, tokenizer = chat_model
    poem = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
    assert ce.poem_room(tokenizer, 5, 4) == len(tokenizer.encode(poem)) + 1


@pytest.mark.slow
def test_evaluate_puts_a_chat_model_beside_a_single_turn_one(small_poems, tiny_chat, tiny_tuned, capsys):
    args = ["--ckpt", str(tiny_chat), "--compare", str(tiny_tuned), "--poems", str(small_poems), "--num-titles", "4",
            "--task-prompts", "2", "--max-new-tokens", "8"]
    evaluate.main(args)
    out = capsys.readouterr().out
    assert "conversations" in out and "conversations asked (seen/held-out)" in out
    evaluate.main(args + ["--json"])
    report = json.loads(capsys.readouterr().out)["checkpoints"]
    chat, single = report[str(tiny_chat)], report[str(tiny_tuned)]
    assert chat["kind"].endswith("(chat)") and "conversations" in chat and "conversations" not in single
    assert set(chat["conversations"]["seen"]) == set(chat["conversations"]["held_out"])
    # The finetune-val loss is the one finetune.py logged for this chat run: the same rows, in its format.
    records = [json.loads(line) for line in tiny_chat.with_name("ckpt_chat.log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "val_loss" in r][-1]
    assert chat["finetune_val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)
    table = ce.format_conversation_table({"chat": chat, "single": single})
    first_row = next(line for line in table.splitlines() if line.startswith("first turn"))
    poem_stop = single["instructions"]["seen"]["poem_stop"]
    assert first_row.split()[-2] == f"{poem_stop:.0%}"  # the single-turn model's title -> poem, in one turn


def test_a_single_turn_form_figure_is_weighed_by_the_forms_the_conversations_asked():
    rates = {"form 五言絕句": 1.0, "form 七言絕句": 0.5, "form 五言律詩": 0.0, "form 七言律詩": 0.0}
    asked = {"forms next": {"五言絕句": 3, "七言絕句": 1}}
    assert ce.single_turn_figure(rates, ("forms", "next"), asked) == (3 * 1.0 + 0.5) / 4
    assert ce.single_turn_figure(rates, ("forms", "same_title_form"), asked) is None  # nothing asked
    assert ce.single_turn_figure({"poem_stop": 0.9}, "poem_stop", asked) == 0.9

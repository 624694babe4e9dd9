"""evaluate.py: the figures, their definitions, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch

from data.corpus import Poem
from data.forms import FORMS, acrostic_head, clauses, form_name, is_regular_form
from data.instruct import INSTRUCTION, Sample, encode_sample, poem_sample, response_rows
from data.tasks import TASKS, instructions
from data.tokenizer import TiktokenTokenizer
import evaluate
from model import GPT
from tanggpt import evaluation
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tanggpt.cli import flag_name
from tanggpt.device import setup_runtime
from tanggpt.generation import Answer
from tanggpt.losses import labelled_nll, stream_loss, title_swap_nll
from tanggpt.rewards import TASK_RULES, task_reward
from tests.test_rewards import LUSHI_STRAY_RHYME, REAL, REPEATED_COUPLET
from tests.tiny_checkpoints import write_adapters, write_checkpoint

FAST = ["--num-titles", "6", "--max-new-tokens", "12", "--batch-size", "16", "--dtype", "float32", "--task-prompts", "3"]


def run_json(capsys, *argv) -> dict:
    evaluate.main(["--json", *FAST, *argv])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def report(small_poems, tiny_tuned, tiny_pretrained):
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        evaluate.main(["--json", *FAST, "--ckpt", str(tiny_tuned), "--compare", str(tiny_pretrained),
                       "--poems", str(small_poems)])
    return json.loads(out.getvalue())


def test_one_column_per_checkpoint_with_every_figure(report, tiny_tuned, tiny_pretrained):
    columns = report["checkpoints"]
    assert list(columns) == [str(tiny_tuned), str(tiny_pretrained)]
    assert columns[str(tiny_tuned)]["kind"] == "sft" and columns[str(tiny_pretrained)]["kind"] == "pretrain"
    for figures in columns.values():
        for key, _, _ in evaluation.ROWS:
            assert key in figures
        for key in ("stop_rate", "regular_form_rate", "memorised_lines"):
            assert 0.0 <= figures[key] <= 1.0
        assert figures["title_gain_se"] > 0 and figures["title_gain_poems"] >= 2
    assert report["titles"] == {"source": "finetune-val", "count": 6}
    reference = report["reference"]  # the real poems of the same 6 titles, by the same prosody checks
    assert reference["kind"] == "real poems" and 0 < reference["regular_shaped"] <= 6
    for figures in (*columns.values(), reference):
        if figures["regular_shaped"]:
            assert 0.0 <= figures["level_rhyme_rate"] <= figures["rhyme_rate"] <= 1.0
        else:  # nothing of that shape: no rate, shown as "–"
            assert figures["rhyme_rate"] is None
    assert report["settings"]["temperature"] == 0.8 and report["settings"]["max_new_tokens"] == 12


def test_a_tuned_column_measures_each_task_with_seen_and_held_out_phrasings(report, tiny_tuned, tiny_pretrained):
    tuned = report["checkpoints"][str(tiny_tuned)]["instructions"]
    assert list(tuned) == ["seen", "held_out"]
    for figures in tuned.values():
        for key, _, _ in evaluation.INSTRUCTION_ROWS:
            assert key == "title_task_gain" or 0.0 <= figures[key] <= 1.0
        for key, _, _ in evaluation.REWARD_ROWS:  # the rule rewards of the same answers
            assert 0.0 <= figures[key] <= 1.0
    assert "instructions" not in report["checkpoints"][str(tiny_pretrained)]  # a base model is asked nothing


TASK_OF = {text: name for name, task in TASKS.items() for held in (False, True) for text in instructions(task, held)}


def scripted_answers(monkeypatch, answer, stops=lambda task, instruction, text: True) -> list:
    """Make evaluate's instruction-following answers answer(task, instruction, input), ended with
    end-of-text where stops(task, instruction, input); return the requests."""
    asked = []

    def fake(model, tokenizer, requests, runtime, *args, **kwargs):
        asked.extend(requests)
        answers = []
        for instruction, text in requests:
            request = (TASK_OF[instruction], instruction, text)
            answers.append(Answer(text, answer(*request), stops(*request), instruction))
        return answers

    monkeypatch.setattr(evaluation, "answer_requests", fake)
    return asked


def perfect(task: str, instruction: str, text: str) -> str:
    if task == "form":
        length, count = next(FORMS[f] for f in FORMS if f in instruction)
        return "\n".join("一" * length + "，" + "二" * length + "。" for _ in range(count // 2))
    if task == "acrostic":  # heads of regular poems and the common heads have an even length
        return "\n".join(f"{a}四五六七，{b}四五六七。" for a, b in zip(text[::2], text[1::2]))
    if task == "continue":
        n = len(clauses(text)[0])
        return "三" * n + "，" + "四" * n + "。"
    return "床前明月光，疑是地上霜。"


def test_instruction_figures_count_what_was_asked(monkeypatch, small_poems, tiny_tuned, capsys):
    asked = scripted_answers(monkeypatch, perfect)
    figures = run_json(capsys, "--ckpt", str(tiny_tuned), "--poems", str(small_poems),
                       "--task-prompts", "4")["checkpoints"][str(tiny_tuned)]["instructions"]
    for kind in ("seen", "held_out"):
        assert all(figures[kind][key] == 1.0 for key, _, _ in evaluation.INSTRUCTION_ROWS if key != "title_task_gain")
    held_out = {text for task in TASKS.values() for text in instructions(task, held_out=True)}
    seen_inputs = [text for instruction, text in asked if instruction not in held_out]
    assert seen_inputs == [text for instruction, text in asked if instruction in held_out]  # the same inputs twice
    assert "春夏秋冬" in seen_inputs and len(asked) == 2 * 4 * 8  # poem, 4 forms, 2 head sets, continue: 4 each

    def wrong(task: str, instruction: str, text: str) -> str:
        return {"continue": text, "acrostic": text[0] + "風。"}.get(task, "春風。")

    scripted_answers(monkeypatch, wrong)
    figures = run_json(capsys, "--ckpt", str(tiny_tuned), "--poems", str(small_poems),
                       "--task-prompts", "4")["checkpoints"][str(tiny_tuned)]["instructions"]["held_out"]
    assert figures["form 五言絕句"] == figures["acrostic_common"] == figures["poem_regular"] == 0.0
    assert figures["acrostic_common_lines"] == 0.25  # one clause, opened by the first of four head characters
    assert figures["continue_no_repeat"] == 0.0 and figures["continue_length"] == 1.0  # it repeated the couplet


# Four real poems that keep every rule (tests/test_rewards.py scores them), one of each form, and a
# copy of each broken in its own way: a repeated couplet, a clause missing, a stray rhyme, none.
KEPT = {title: REAL[title] for title in ("登鸛雀樓", "早發白帝城", "春夜喜雨", "登高")}
BROKEN = {"登鸛雀樓": REPEATED_COUPLET, "早發白帝城": REAL["早發白帝城"].rsplit("，", 1)[0] + "。",
          "春夜喜雨": LUSHI_STRAY_RHYME, "登高": REAL["登高"]}


def poem_asked_about(task: str, instruction: str, text: str) -> str | None:
    """The title of the KEPT poem a request is about: by its title, its form, its acrostic head or
    its first couplet; None for the common acrostic heads, which no KEPT poem has."""
    return next((title for title, body in KEPT.items()
                 if text == {"poem": title, "acrostic": acrostic_head(body), "continue": body.split("\n")[0]}.get(task)
                 or task == "form" and form_name(body) in instruction), None)


def answer_from(poems: dict[str, str]):
    """Answer each request with the version in `poems` of the poem it is about (for continue, its
    lines after the given couplet); a common acrostic head (no reward judges those) a clause of nothing."""
    def answer(task: str, instruction: str, text: str) -> str:
        title = poem_asked_about(task, instruction, text)
        if title is None:
            return "春風。"
        return poems[title].split("\n", 1)[1] if task == "continue" else poems[title]
    return answer


def asked_instruction_figures(monkeypatch, tiny_tuned, answer, stops=lambda *request: True):
    """instruction_figures on the KEPT poems, with scripted answers; (figures, requests asked)."""
    asked = scripted_answers(monkeypatch, answer, stops)
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    poems = [Poem(title, body.split("\n")) for title, body in KEPT.items()]
    config = evaluation.EvaluationConfig(task_prompts=len(poems), max_new_tokens=4, batch_size=4)
    figures = evaluation.instruction_figures(model.eval(), model, tokenizer, poems, config,
                                             setup_runtime("cpu", "float32"))
    return figures, asked


def expected_reward_figures(asked, answer, stops) -> dict[str, dict[str, float]]:
    """Per kind, each judged task's mean reward and rule pass rates, computed here from task_reward
    of each request asked: {kind: {(task, "reward" or rule): figure}}."""
    held_out = {text for task in TASKS.values() for text in instructions(task, held_out=True)}
    rewards = {"seen": {}, "held_out": {}}
    for instruction, text in asked:
        task = TASK_OF[instruction]
        if task not in TASK_RULES or task == "acrostic" and text in evaluation.COMMON_HEADS:
            continue
        form = next((f for f in FORMS if f in instruction), "") if task == "form" else ""
        reward = task_reward(task, answer(task, instruction, text), stops(task, instruction, text), text, form)
        rewards["held_out" if instruction in held_out else "seen"].setdefault(task, []).append(reward)
    expected = {}
    for kind, by_task in rewards.items():
        expected[kind] = {}
        for task, task_rewards in by_task.items():
            expected[kind][task, "reward"] = sum(r.total for r in task_rewards) / len(task_rewards)
            for rule in TASK_RULES[task]:
                passed = [r.rules[rule] == 1.0 for r in task_rewards]
                expected[kind][task, rule] = passed.count(True) / len(passed)
    return expected


def test_the_rule_rewards_are_those_of_the_answers_asked(monkeypatch, tiny_tuned):
    """Each task a rule judges gets its mean reward and every rule's pass rate, from the same answers."""
    assert set(evaluation.REWARD_TASKS) == set(TASK_RULES)  # a task given rules is reported too
    perfect_answer = answer_from(KEPT)
    figures, asked = asked_instruction_figures(monkeypatch, tiny_tuned, perfect_answer)
    for kind in ("seen", "held_out"):  # real poems that keep every rule: every rule passes
        for task, rules in TASK_RULES.items():
            assert figures[kind][evaluation.reward_key(task)] == 1.0
            assert all(figures[kind][evaluation.rule_key(task, rule)] == 1.0 for rule in rules)
    # No extra sampling: poem, four forms, two head sets and continue, one answer per poem each.
    assert len(asked) == 2 * 8 * len(KEPT)

    broken_answer = answer_from(BROKEN)

    def stops(task: str, instruction: str, text: str) -> bool:  # 登高 runs to the length limit
        return poem_asked_about(task, instruction, text) != "登高"

    figures, asked = asked_instruction_figures(monkeypatch, tiny_tuned, broken_answer, stops)
    expected = expected_reward_figures(asked, broken_answer, stops)
    for kind in ("seen", "held_out"):
        assert set(expected[kind]) == {(task, rule) for task in TASK_RULES for rule in ("reward", *TASK_RULES[task])}
        for (task, rule), value in expected[kind].items():
            key = evaluation.reward_key(task) if rule == "reward" else evaluation.rule_key(task, rule)
            assert figures[kind][key] == pytest.approx(value), key
        # By hand: one of four poems repeats its couplet, one lost a clause, one does not stop.
        assert figures[kind]["rule poem no_repeat"] == figures[kind]["rule poem stop"] == 0.75
        assert figures[kind]["rule poem regular_form"] == figures[kind]["rule form form"] == 0.75
        assert figures[kind]["rule continue no_copy"] == 0.75  # the repeated couplet copies the given one
        assert figures[kind]["rule acrostic acrostic"] == 0.5  # the repeated couplet and the missing clause
        for task in TASK_RULES:
            assert figures[kind][evaluation.reward_key(task)] < 1.0

    table = evaluation.format_instruction_table({"ckpt_broken.pt": {"instructions": figures}}).splitlines()
    block = table[next(i for i, line in enumerate(table) if line.startswith("rule rewards")) + 1:]
    assert len(block) == len(evaluation.REWARD_ROWS)  # the rewards close the table, one line each
    for (key, label, fmt), line in zip(evaluation.REWARD_ROWS, block):
        assert line.startswith(label) and line.split()[-2:] == [fmt.format(figures[kind][key])
                                                                for kind in ("seen", "held_out")]


def test_bits_per_character_follow_from_the_loss(report):
    # The char tokenizer has one token per character: bits/char = nats/token / ln 2.
    for figures in report["checkpoints"].values():
        assert figures["pretrain_val_bpc"] == pytest.approx(figures["pretrain_val_loss"] / math.log(2))


def test_the_finetune_val_loss_is_the_one_finetune_py_logs(report, tiny_tuned):
    # One definition (data.tasks.finetune_val_rows): evaluate.py's figure for the tuned
    # checkpoint is the val_loss finetune.py logged when it saved that checkpoint.
    records = [json.loads(line) for line in tiny_tuned.with_name("ckpt_sft.log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "val_loss" in r][-1]
    assert logged["step"] == load_checkpoint(tiny_tuned)["step"]
    figures = report["checkpoints"][str(tiny_tuned)]
    assert figures["finetune_val_loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_stream_loss_is_the_mean_over_consecutive_windows(tiny_pretrained, small_poems):
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_pretrained))
    model.eval()
    tokens = tokenizer.encode_array("床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n\n" * 20)
    block = model.config.block_size
    n = (len(tokens) - 1) // block
    ids = torch.from_numpy(tokens.astype("int64"))
    expected = sum(model(ids[i * block : (i + 1) * block][None], ids[i * block + 1 : (i + 1) * block + 1][None])[1].item()
                   for i in range(n)) / n
    runtime = setup_runtime("cpu", "float32")
    assert stream_loss(model, tokens, 3, runtime) == pytest.approx(expected, rel=1e-5)


def test_per_row_losses_match_the_models_own_loss(tiny_tuned):
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    model.eval()
    samples = [Sample(INSTRUCTION, "靜夜思", "床前明月光，疑是地上霜。"), Sample(INSTRUCTION, "春曉", "春眠不覺曉")]
    rows = [encode_sample(tokenizer, s, "response")[::2] for s in samples]  # (inputs, response labels)
    nll, count = labelled_nll(model, rows, tokenizer.eot_id, 8, setup_runtime("cpu", "float32"))
    for (inputs, labels), row_nll, row_count in zip(rows, nll, count):
        _, loss = model(torch.tensor([inputs]), torch.tensor([labels]))
        assert row_count == sum(label != -100 for label in labels)
        assert row_nll.item() == pytest.approx(loss.item() * row_count.item(), rel=1e-5)


def test_title_swap_pairs_each_poem_with_another_title(tiny_tuned, splits):
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    poems = [p for p in splits["finetune_val"] if len(p.body) < 60][:12]
    poems.append(Poem("長題" * 45, ["一二三四五，六七八九十。"]))  # its sample does not fit block 96
    runtime = setup_runtime("cpu", "float32")
    swap = title_swap_nll(model.eval(), tokenizer, poems, 5, runtime, seed=3)
    # Out: the long-titled poem, and the poem that got its title as the other one.
    assert len(poems) - 1 not in swap.poems and len(swap.poems) == len(poems) - 2
    assert torch.equal(swap.gains, swap.nll_swapped - swap.nll_own)
    own = response_rows(tokenizer, [poem_sample(poems[i]) for i in swap.poems], model.config.block_size)
    nll, count = labelled_nll(model, own, tokenizer.eot_id, 5, runtime)
    assert torch.allclose(nll, swap.nll_own) and torch.equal(count, swap.count)
    assert not torch.allclose(swap.nll_swapped, swap.nll_own)  # another title changes every poem's likelihood
    again = title_swap_nll(model, tokenizer, poems, 5, runtime, seed=3)
    assert torch.equal(again.nll_swapped, swap.nll_swapped)  # the pairing is seeded


def test_eval_poems_takes_every_poem_of_the_folder(tmp_path, small_poems, tiny_tuned, capsys):
    folder = tmp_path / "other"
    folder.mkdir()
    shutil.copy(small_poems / "poet.tang.0.json", folder / "poet.tang.0.json")
    poems = json.loads((folder / "poet.tang.0.json").read_text(encoding="utf-8"))[:9]
    (folder / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    argv = ["--json", *FAST[2:], "--ckpt", str(tiny_tuned), "--poems", str(small_poems), "--eval-poems", str(folder)]
    assert FAST[:2] == ["--num-titles", "6"]
    evaluate.main(argv)  # --num-titles not typed: every poem of the folder
    report = json.loads(capsys.readouterr().out)
    assert report["titles"]["count"] == 9 and str(folder) in report["titles"]["source"]


def test_num_titles_typed_with_eval_poems_takes_the_first_of_them(tmp_path, small_poems, tiny_tuned, capsys):
    """Before, --num-titles was silently ignored with --eval-poems: all 9 poems were asked for."""
    folder = tmp_path / "other"
    folder.mkdir()
    poems = json.loads((small_poems / "poet.tang.0.json").read_text(encoding="utf-8"))[:9]
    (folder / "poet.tang.0.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    report = run_json(capsys, "--ckpt", str(tiny_tuned), "--poems", str(small_poems), "--eval-poems", str(folder),
                      "--num-titles", "4", "--task-prompts", "0")
    assert report["titles"] == {"source": f"the first 4 poems of {folder}", "count": 4}


def test_table_prints_settings_and_rows(small_poems, tiny_tuned, capsys):
    evaluate.main([*FAST, "--ckpt", str(tiny_tuned), "--poems", str(small_poems), "--temperature", "0"])
    out = capsys.readouterr().out
    assert "temperature 0, top-k off, top-p off, at most 12 tokens, seed 1337" in out
    for _, label, _ in evaluation.ROWS:
        assert label in out
    for _, label, _ in (*evaluation.INSTRUCTION_ROWS, *evaluation.REWARD_ROWS):  # the tuned model's instructions
        assert f"\n{label} " in out
    assert " ± " in out
    assert "real poems" in out.splitlines()[1]  # the reference column


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--help"])
    assert exit_info.value.code == 0
    # argparse wraps the help, at spaces and after hyphens: compared with every space taken out
    options = "".join(capsys.readouterr().out.split("options:")[1].split())
    for field in dataclasses.fields(evaluate.EvaluateConfig):
        help_text = "".join(field.metadata["help"].split())
        assert help_text and flag_name(field.name) in options and help_text in options, field.name
    assert "rulerewards" in options  # --task-prompts names what it also measures


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "missing.pt"], "--ckpt: no checkpoint at missing.pt"),
    (["--compare", "missing.pt"], "--compare: no checkpoint at missing.pt"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must not be negative"),
    (["--num-titles", "0"], "--num-titles must be positive"),
])
def test_bad_input_is_one_line(tmp_path, small_poems, tiny_tuned, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--poems", str(small_poems), "--ckpt", str(tiny_tuned), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_poems_folder_missing(small_poems, tiny_tuned, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([*FAST, "--ckpt", str(tiny_tuned), "--poems", str(small_poems), "--eval-poems", "nowhere"])
    assert "nowhere" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Checked before the long work; flags that say what they mean (issue 23)


def char_tokenizer_of(path):
    return model_and_tokenizer(load_checkpoint(path))[1]


@pytest.fixture
def no_work(monkeypatch) -> list[str]:
    """Record any sampling or corpus loading evaluate.py starts."""
    started: list[str] = []
    original_load = evaluate.load_corpus
    monkeypatch.setattr(GPT, "generate_stream", lambda *a, **k: started.append("sampling") or iter(()))
    monkeypatch.setattr(evaluate, "load_corpus", lambda *a, **k: started.append("corpus") or original_load(*a, **k))
    return started


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([*FAST, "--device", "cpu", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_rhyme_with_a_tiktoken_compare_fails_before_any_sampling(tmp_path, small_poems, tiny_tuned, no_work, capsys):
    """Before: the --ckpt column was evaluated in full, then --rhyme failed on --compare's tokenizer."""
    tiktoken_ckpt = write_checkpoint(tmp_path / "bpe.pt", TiktokenTokenizer.from_texts("cl100k_base", ["春夜喜雨"]))
    err = one_line_error(["--ckpt", str(tiny_tuned), "--compare", str(tiktoken_ckpt), "--rhyme", "--poems",
                          str(small_poems)], capsys)
    assert f"--compare {tiktoken_ckpt}: --rhyme needs the char tokenizer" in err
    assert no_work == []


def one_line_poems(small_poems, folder):
    """small_poems with each poem's lines run into one: no poem has a first couplet to continue."""
    folder.mkdir()
    for path in small_poems.glob("*.json"):
        records = json.loads(path.read_text(encoding="utf-8"))
        for record in records:
            record["paragraphs"] = ["".join(record["paragraphs"])]
        (folder / path.name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return folder


def test_task_prompts_on_poems_with_nothing_to_continue_report_no_figure(tmp_path, small_poems, tiny_tuned, capsys):
    """Before: ZeroDivisionError after every other task's answers had been generated."""
    folder = one_line_poems(small_poems, tmp_path / "one_line")
    figures = run_json(capsys, "--ckpt", str(tiny_tuned), "--poems", str(folder), "--task-prompts", "2",
                       "--max-new-tokens", "4")["checkpoints"][str(tiny_tuned)]["instructions"]
    for kind in ("seen", "held_out"):
        assert figures[kind]["continue_stop"] is None and figures[kind]["continue_no_repeat"] is None
        assert figures[kind]["reward continue"] is None  # no answer to reward, and no rule to pass
        assert all(figures[kind][evaluation.rule_key("continue", rule)] is None for rule in TASK_RULES["continue"])
        assert 0 <= figures[kind]["acrostic_common"] <= 1  # the other tasks are measured as before
        assert 0 <= figures[kind]["reward acrostic"] <= 1
    table = evaluation.format_instruction_table({"tuned": {"instructions": figures}})
    assert "continue: stop" in table and "–" in table
    reward_line = next(line for line in table.splitlines() if line.startswith("continue: reward"))
    assert reward_line.split()[-2:] == ["–", "–"]


def test_instruction_figures_of_poems_with_no_regular_form_are_none(monkeypatch, tiny_tuned):
    """Before: ZeroDivisionError on the acrostic of unseen heads (taken from regular-form poems)."""
    scripted_answers(monkeypatch, perfect)
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    poems = [Poem("春日", ["春風吹綠草，白日照青山遠。", "花落水自流，鳥啼山更幽。"]),
             Poem("秋夜", ["秋月明如水，長夜照空庭靜。", "霜落寒山寺，鐘聲到客船。"])]
    assert not any(is_regular_form(p.body) for p in poems)  # one clause of 6: no regular form
    config = evaluation.EvaluationConfig(task_prompts=2, max_new_tokens=4, batch_size=4)
    figures = evaluation.instruction_figures(model.eval(), model, tokenizer, poems, config,
                                             setup_runtime("cpu", "float32"))
    for kind in ("seen", "held_out"):
        assert figures[kind]["acrostic_unseen"] is None and figures[kind]["acrostic_unseen_lines"] is None
        assert figures[kind]["acrostic_common"] == 1.0 and figures[kind]["poem_stop"] == 1.0


def test_the_unseen_acrostic_heads_are_those_of_jueju_and_lushi(monkeypatch, tiny_tuned):
    """A long regulated poem (排律, here 12 clauses) is a regular form, but its 12 heads ask for a
    poem no 絕句 or 律詩 is: only the heads of the four forms are asked (the RL stage's acrostics)."""
    asked = scripted_answers(monkeypatch, perfect)
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    long_poem = Poem("長律", ["春風吹綠草，白日照青山。"] * 6)
    quatrain = Poem("秋夜", ["秋月明如水，長夜照空庭。", "霜落寒山寺，鐘聲到客船。"])
    assert is_regular_form(long_poem.body) and len(acrostic_head(long_poem.body)) == 12
    config = evaluation.EvaluationConfig(task_prompts=2, max_new_tokens=4, batch_size=4)
    figures = evaluation.instruction_figures(model.eval(), model, tokenizer, [long_poem, quatrain], config,
                                             setup_runtime("cpu", "float32"))
    heads = {text for instruction, text in asked if TASK_OF[instruction] == "acrostic"}
    assert acrostic_head(quatrain.body) in heads and acrostic_head(long_poem.body) not in heads
    assert figures["seen"]["acrostic_unseen"] == 1.0


def adapter_pair(tmp_path, tiny_tuned):
    """Two adapter checkpoints, each on its own base, both bases moved away from the recorded paths."""
    tokenizer = char_tokenizer_of(tiny_tuned)
    pairs = []
    for name, seed in (("a", 1), ("b", 2)):
        folder = tmp_path / name
        folder.mkdir()
        base = write_checkpoint(folder / "kept_base.pt", tokenizer, "pretrain", seed=seed)
        pairs.append((write_adapters(folder / "lora.pt", base, recorded_base=tmp_path / "gone" / f"{name}.pt"), base))
    return pairs


def test_base_is_the_ckpts_and_compare_base_the_compares(tmp_path, small_poems, tiny_tuned, capsys):
    """Before: --base was applied to both columns, so two adapter checkpoints on two bases could not be compared."""
    (a, a_base), (b, b_base) = adapter_pair(tmp_path, tiny_tuned)
    report = run_json(capsys, "--ckpt", str(a), "--base", str(a_base), "--compare", str(b), "--compare-base",
                      str(b_base), "--poems", str(small_poems), "--num-titles", "2", "--task-prompts", "0",
                      "--max-new-tokens", "4")
    assert [f["kind"] for f in report["checkpoints"].values()] == ["sft + LoRA r2", "sft + LoRA r2"]
    err = one_line_error(["--ckpt", str(a), "--base", str(b_base), "--poems", str(small_poems)], capsys)
    assert "its adapters were trained on other weights than" in err


@pytest.mark.parametrize("flags", [["--ckpt", "{full}", "--base", "{base}"],
                                   ["--ckpt", "{full}", "--compare", "{full2}", "--compare-base", "{base}"]])
def test_a_base_for_a_checkpoint_without_adapters_is_refused(tmp_path, small_poems, tiny_tuned, tiny_pretrained,
                                                             no_work, flags, capsys):
    """Before: --base was ignored without a word (and --compare-base did not exist)."""
    paths = {"full": tiny_tuned, "full2": tiny_pretrained, "base": tiny_pretrained}
    argv = [arg.format(**{k: str(v) for k, v in paths.items()}) for arg in flags]
    err = one_line_error([*argv, "--poems", str(small_poems)], capsys)
    base_flag = argv[-2]
    assert f"{base_flag} {tiny_pretrained}: " in err and "holds no LoRA adapters" in err and f"drop {base_flag}" in err
    assert no_work == []


@pytest.mark.parametrize("case", ["same file", "compare-base alone", "eval-poems is poems", "base is a folder",
                                  "temperature nan", "seed overflow", "empty compare"])
def test_flags_that_cannot_work_are_refused_up_front(tmp_path, small_poems, tiny_tuned, no_work, case, capsys):
    """Before, each of these ran on (one column, or training poems taken as unseen), ignored a flag,
    said the wrong thing, or crashed with a traceback once sampling began."""
    (adapters, _), _ = adapter_pair(tmp_path, tiny_tuned)
    argv, expected = {
        "same file": (["--compare", str(tiny_tuned.parent / ".." / tiny_tuned.parent.name / tiny_tuned.name)],
                      "is the --ckpt checkpoint itself"),
        "compare-base alone": (["--compare-base", str(tiny_tuned)], "give --compare too"),
        "eval-poems is poems": (["--eval-poems", str(small_poems)], "is the --poems folder itself"),
        "base is a folder": (["--ckpt", str(adapters), "--base", str(tmp_path)], f"--base {tmp_path} is a folder"),
        "temperature nan": (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
        "seed overflow": (["--seed", str(2**64)], f"--seed must be between {-2**63} and {2**64 - 1}"),
        "empty compare": (["--compare", ""], "--compare is empty"),
    }[case]
    err = one_line_error(["--ckpt", str(tiny_tuned), "--poems", str(small_poems), *argv], capsys)
    assert expected in err
    assert no_work == []


def test_a_compare_whose_block_fits_too_few_poems_fails_before_any_figure(tmp_path, small_poems, tiny_tuned,
                                                                          no_work, capsys):
    """Before: the --ckpt column was evaluated in full, then --compare's block_size was found too short."""
    short = write_checkpoint(tmp_path / "short.pt", char_tokenizer_of(tiny_tuned), block_size=16)
    err = one_line_error(["--ckpt", str(tiny_tuned), "--compare", str(short), "--poems", str(small_poems)], capsys)
    assert f"--compare {short}: only 0 regular-form finetune-val poems fit its block_size 16" in err
    assert "sampling" not in no_work


@pytest.mark.parametrize("damage, expected", [
    (lambda ckpt: ckpt.update(kind="sft2"), "unknown checkpoint kind 'sft2'"),
    (lambda ckpt: ckpt["model_config"].update(n_head=3), "its model_config describes no model this code builds "
                                                         "(n_embd (16) must be divisible by n_head (3))"),
    (lambda ckpt: ckpt["model"].pop("wte.weight"), "its weights do not match its model_config (Missing key"),
])
def test_a_damaged_checkpoint_is_one_line(tmp_path, small_poems, tiny_tuned, damage, expected, capsys):
    """Before: a TypeError or RuntimeError traceback from the model's constructor or load_state_dict."""
    path = write_checkpoint(tmp_path / "damaged.pt", char_tokenizer_of(tiny_tuned))
    ckpt = load_checkpoint(path)
    damage(ckpt)
    torch.save(ckpt, path)
    err = one_line_error(["--ckpt", str(tiny_tuned), "--compare", str(path), "--poems", str(small_poems)], capsys)
    assert err.startswith(f"error: --compare {path}: ") and expected in err


def test_titles_whose_prompt_does_not_fit_the_block_are_left_out(tmp_path, small_poems, tiny_tuned, capsys):
    """Before: the long title's prompt was cropped from the front, instruction first, without a word."""
    folder = tmp_path / "other"
    folder.mkdir()
    poems = json.loads((small_poems / "poet.tang.0.json").read_text(encoding="utf-8"))[:3]
    poems[1]["title"] = "長" * 90  # with the instruction and 3 markers, past block_size 96
    (folder / "poems.json").write_text(json.dumps(poems, ensure_ascii=False), encoding="utf-8")
    evaluate.main(["--json", *FAST[2:], "--ckpt", str(tiny_tuned), "--poems", str(small_poems), "--eval-poems",
                   str(folder), "--task-prompts", "0"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["titles"]["count"] == 2
    assert f"note: 1 of the 3 titles of --eval-poems {folder} left out" in captured.err


def test_task_prompts_for_base_checkpoints_only_is_noted(small_poems, tiny_pretrained, capsys):
    """Before: --task-prompts was silently unused when no checkpoint was tuned."""
    evaluate.main([*FAST, "--ckpt", str(tiny_pretrained), "--poems", str(small_poems), "--json"])
    captured = capsys.readouterr()
    assert "note: --task-prompts: no checkpoint here is tuned to answer instructions" in captured.err
    assert "instructions" not in json.loads(captured.out)["checkpoints"][str(tiny_pretrained)]


def test_a_title_gain_with_fewer_than_two_poems_is_none(tiny_tuned):
    """Before: a UserError from inside the first column's figures, after the corpus and the losses."""
    model, tokenizer = model_and_tokenizer(load_checkpoint(tiny_tuned))
    body = ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]
    val = [Poem("靜夜思", body), Poem("春曉", ["春眠不覺曉，處處聞啼鳥。", "夜來風雨聲，花落知多少。"]),
           Poem("長" * 80, ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"])]
    splits = {"pretrain_val": val, "finetune_train": [], "finetune_val": val}
    figures = evaluation.loss_figures(model.eval(), tokenizer, splits, 4, setup_runtime("cpu", "float32"), seed=0)
    assert figures["title_gain"] is None and figures["title_gain_poems"] == 1 and figures["finetune_val_loss"] > 0


def test_instruction_table_lines_up_rows_with_chinese_labels():
    """The form rows' labels hold 五言絕句 …, two columns each in a terminal: counted as one,
    each such row stood four columns right of the others (before tanggpt/columns.py)."""
    from tanggpt.columns import display_width

    figures = {kind: {key: 0.5 for key, _, _ in evaluation.INSTRUCTION_ROWS} for kind in ("seen", "held_out")}
    table = evaluation.format_instruction_table({"ckpt_詩.pt": {"instructions": figures}}).splitlines()
    rows = [line for line in table if not line.startswith("rule rewards")]
    assert any("五言絕句" in line for line in rows) and any(line.startswith("  per line") for line in rows)
    assert len({display_width(line) for line in rows}) == 1, [display_width(line) for line in rows]

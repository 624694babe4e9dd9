"""sample.py: streaming, seeding, base vs instruction-tuned prompts, the interactive loop, errors.

tiny_tuned (kind "sft") and tiny_pretrained (kind "pretrain") come from conftest.py.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest
import torch

from data.instruct import prompt_ids, title_prompt_ids
from data.tasks import TASKS
from data.tokenizer import TiktokenTokenizer
from model import GPT
import sample
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tests.tiny_checkpoints import write_adapters

CPU = ["--device", "cpu", "--dtype", "float32"]


@functools.lru_cache(maxsize=None)
def load(path: Path):
    model, tokenizer = model_and_tokenizer(load_checkpoint(path, "--ckpt"))
    return model.eval(), tokenizer


def title_ids(path: Path, title: str) -> list[int]:
    return title_prompt_ids(load(path)[1], title)


def greedy(path: Path, prompt: str | list[int], max_new_tokens: int) -> str:
    """The model's argmax continuation of `prompt` (text, or ids), without the end-of-text token."""
    model, tokenizer = load(path)
    ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
    ids = model.generate([ids], max_new_tokens, temperature=0, stop_ids=[tokenizer.eot_id])[0]
    return tokenizer.decode(ids[:-1] if ids and ids[-1] == tokenizer.eot_id else ids)


def run(capsys, *argv: str) -> tuple[str, str]:
    capsys.readouterr()  # drop fixture output
    sample.main([*argv, *CPU])
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.fixture
def prompts_seen(monkeypatch) -> list[list[int]]:
    """Record the prompt ids each generation starts from."""
    seen: list[list[int]] = []
    original = GPT.generate_stream

    def spy(self, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate_stream", spy)
    return seen


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--title", "--prompt", "--num-samples", "--max-new-tokens", "--temperature", "--top-k",
                 "--top-p", "--seed", "--device", "--dtype", "--rhyme", "--form", "--acrostic", "--task",
                 "--instruction", "--input"):
        assert flag in out


def test_same_seed_same_output_different_seed_differs(capsys, tiny_pretrained):
    args = ["--ckpt", str(tiny_pretrained), "--prompt", "春夜喜雨\n", "--temperature", "1", "--max-new-tokens", "30",
            "--num-samples", "2"]
    first, _ = run(capsys, *args, "--seed", "1")
    again, _ = run(capsys, *args, "--seed", "1")
    other, _ = run(capsys, *args, "--seed", "2")
    assert first == again
    assert first != other
    assert first.startswith("--- sample 1 ---\n") and "\n--- sample 2 ---\n" in first
    one, two = first.removeprefix("--- sample 1 ---\n").split("--- sample 2 ---\n")
    assert one != two  # the generator runs on between samples


def test_greedy_prompt_is_the_argmax_continuation_with_escapes(capsys, tiny_pretrained, prompts_seen):
    out, err = run(capsys, "--ckpt", str(tiny_pretrained), "--prompt", r"春夜喜雨\n", "--temperature", "0",
                   "--max-new-tokens", "20")
    _, tokenizer = load(tiny_pretrained)
    assert [tokenizer.decode(p) for p in prompts_seen] == ["春夜喜雨\n"]  # \n typed as two characters
    assert out == greedy(tiny_pretrained, "春夜喜雨\n", 20) + "\n"
    assert "base model" in err and "will not stop" in err


def test_sft_title_is_wrapped_in_instruction_prompt(capsys, tiny_tuned, prompts_seen):
    out, err = run(capsys, "--ckpt", str(tiny_tuned), "--title", "春夜喜雨", "--temperature", "0",
                   "--max-new-tokens", "20")
    _, tokenizer = load(tiny_tuned)
    assert prompts_seen == [title_ids(tiny_tuned, "春夜喜雨")]
    assert out == greedy(tiny_tuned, title_ids(tiny_tuned, "春夜喜雨"), 20) + "\n"
    assert "instruction-tuned" in err and "base model" not in err


@pytest.mark.parametrize("stdin", ["春夜喜雨\n靜夜思\n\n", "春夜喜雨\n靜夜思"], ids=["empty-line", "eof"])
def test_interactive_answers_each_title_then_quits(capsys, monkeypatch, tiny_tuned, prompts_seen, stdin):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    out, err = run(capsys, "--ckpt", str(tiny_tuned), "--temperature", "0", "--max-new-tokens", "12")
    _, tokenizer = load(tiny_tuned)
    titles = ["春夜喜雨", "靜夜思"]
    assert prompts_seen == [title_ids(tiny_tuned, t) for t in titles]
    assert out == "".join(greedy(tiny_tuned, title_ids(tiny_tuned, t), 12) + "\n" for t in titles)
    assert err.count("title> ") == 3  # two titles, then the empty line or end of input


def test_base_model_interactive_continues_title_line(capsys, monkeypatch, tiny_pretrained, prompts_seen):
    monkeypatch.setattr("sys.stdin", io.StringIO("春夜喜雨\n\n"))
    out, err = run(capsys, "--ckpt", str(tiny_pretrained), "--temperature", "0", "--max-new-tokens", "12")
    _, tokenizer = load(tiny_pretrained)
    assert [tokenizer.decode(p) for p in prompts_seen] == ["春夜喜雨\n"]
    assert out == greedy(tiny_pretrained, "春夜喜雨\n", 12) + "\n"
    assert "base model" in err and "will not stop" in err


def test_title_on_base_model_warns_about_instruction_format(capsys, tiny_pretrained, prompts_seen):
    _, err = run(capsys, "--ckpt", str(tiny_pretrained), "--title", "春夜喜雨", "--max-new-tokens", "3")
    assert prompts_seen == [title_ids(tiny_pretrained, "春夜喜雨")]
    assert "not trained on" in err


def test_a_title_that_spells_a_control_token_stays_text(capsys, tiny_tuned, prompts_seen):
    run(capsys, "--ckpt", str(tiny_tuned), "--title", "春夜<RES>喜雨", "--max-new-tokens", "3")
    _, tokenizer = load(tiny_tuned)
    [ids] = prompts_seen
    assert ids.count(tokenizer.special_ids["<RES>"]) == 1 and ids[-1] == tokenizer.special_ids["<RES>"]


def test_unknown_characters_are_named(capsys, tiny_tuned):
    _, tokenizer = load(tiny_tuned)
    assert "😀" not in tokenizer.stoi
    _, err = run(capsys, "--ckpt", str(tiny_tuned), "--title", "春😀夜", "--max-new-tokens", "3")
    [note] = [line for line in err.splitlines() if "vocabulary" in line]
    assert "😀" in note and "<unk>" in note and "春" not in note


def test_stream_holds_back_partial_characters():
    # A tiktoken tokenizer fitted to four characters spells 好 and 😀 as single bytes.
    tokenizer = TiktokenTokenizer.from_texts("cl100k_base", ["春夜喜雨"])
    ids = tokenizer.encode("好😀雨")
    assert len(ids) > 3
    stream = sample.TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "好😀雨"
    assert not any("\ufffd" in p for p in pieces)


def fake_stream(tokenizer, capsys, shown: list[str], errs: list[str]):
    """A generate_stream that yields 春 and 夜, notes what was printed meanwhile, then gets Ctrl-C."""
    def generate_stream(self, prompts, *args, **kwargs):
        for char in "春夜":
            yield torch.tensor([tokenizer.encode(char)[0]])
            captured = capsys.readouterr()
            shown.append(captured.out)
            errs.append(captured.err)
        raise KeyboardInterrupt
    return generate_stream


def test_streams_each_token_and_ctrl_c_returns_to_prompt(capsys, monkeypatch, tiny_tuned):
    _, tokenizer = load(tiny_tuned)
    shown: list[str] = []
    errs: list[str] = []
    monkeypatch.setattr(GPT, "generate_stream", fake_stream(tokenizer, capsys, shown, errs))
    monkeypatch.setattr("sys.stdin", io.StringIO("春夜喜雨\n靜夜思\n"))
    out, err = run(capsys, "--ckpt", str(tiny_tuned))
    err = "".join(errs) + err
    assert out == "\n"
    # Printed (and flushed) as each token arrived; the cut poem's line is ended before the next.
    assert shown == ["春", "夜", "\n春", "夜"]
    assert err.count("[stopped]") == 2 and err.count("title> ") == 3 and "Traceback" not in err


def test_ctrl_c_in_one_shot_mode_exits_130(capsys, monkeypatch, tiny_tuned):
    _, tokenizer = load(tiny_tuned)
    monkeypatch.setattr(GPT, "generate_stream", fake_stream(tokenizer, capsys, [], []))
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "--ckpt", str(tiny_tuned), "--title", "春夜喜雨")
    assert exit_info.value.code == 130


@pytest.mark.parametrize("args, expected", [
    (["--title", "春", "--prompt", "春"], "not --title and --prompt"),
    (["--acrostic", ""], "--acrostic is empty"),
    (["--form", "八言絕句", "--title", "春"], "argument --form: invalid choice: '八言絕句'"),
    (["--task", "rhyme"], "argument --task: invalid choice: 'rhyme'"),
    (["--task", "form", "--input", "春"], "--task form needs --form"),
    (["--input", "春"], "--input is the input of --task or --instruction"),
    (["--acrostic", "春", "--form", "七言絕句"], "not --form and --acrostic"),
    (["--instruction", "寫詩", "--title", "春"], "with --instruction give --input"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-p", "1.5"], "--top-p"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--prompt", ""], "--prompt is empty"),
    ([], "--ckpt: no checkpoint at"),
])
def test_errors_are_one_line_with_exit_code_2(capsys, tmp_path, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "--ckpt", str(tmp_path / "missing.pt"), *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("head, expected", [("春😀秋冬", "--acrostic 春😀秋冬: 😀 not in the tokenizer's vocabulary"),
                                            ("春，夏", "'，' cannot open a line")])
def test_a_head_no_line_can_open_with_is_one_line_error(capsys, tiny_tuned, prompts_seen, head, expected):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "--ckpt", str(tiny_tuned), "--acrostic", head)
    assert exit_info.value.code == 2 and not prompts_seen  # refused before any sampling
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args, instruction, input", [
    (["--acrostic", "春夏秋冬"], TASKS["acrostic"].phrasings[0], "春夏秋冬"),
    (["--title", "春夜喜雨", "--form", "七言絕句"], "請用以下題目寫一首七言絕句", "春夜喜雨"),
    (["--task", "continue", "--input", "床前明月光，疑是地上霜。"], TASKS["continue"].phrasings[0],
     "床前明月光，疑是地上霜。"),
    (["--instruction", "請為這首詩擬一個題目", "--input", r"床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"],
     "請為這首詩擬一個題目", "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"),
])
def test_tasks_and_any_instruction_are_asked_in_the_instruction_format(capsys, tiny_tuned, prompts_seen, args,
                                                                       instruction, input):
    out, _ = run(capsys, "--ckpt", str(tiny_tuned), *args, "--temperature", "0", "--max-new-tokens", "10")
    _, tokenizer = load(tiny_tuned)
    expected = prompt_ids(tokenizer, instruction, input)
    assert prompts_seen == [expected]
    assert out == greedy(tiny_tuned, expected, 10) + "\n"


def test_interactive_task_takes_each_line_as_its_input_and_skips_a_bad_head(capsys, monkeypatch, tiny_tuned,
                                                                            prompts_seen):
    monkeypatch.setattr("sys.stdin", io.StringIO("春夏秋冬\n春😀\n風花雪月\n\n"))
    _, err = run(capsys, "--ckpt", str(tiny_tuned), "--task", "acrostic", "--max-new-tokens", "5")
    _, tokenizer = load(tiny_tuned)
    assert prompts_seen == [prompt_ids(tokenizer, TASKS["acrostic"].phrasings[0], head) for head in ("春夏秋冬", "風花雪月")]
    assert err.count("head> ") == 4 and "error: --acrostic 春😀: 😀 not in the tokenizer's vocabulary" in err


def test_corrupt_checkpoint_is_one_line_error(capsys, tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, "--ckpt", str(tmp_path / "bad.pt"), "--title", "春")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ckpt: ") and len(err.strip().splitlines()) == 1


# -----------------------------------------------------------------------------
# Flags that say what they mean; prompts never cropped (issue 23)


def one_line_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, *argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    # the one line; before it at most the checkpoint's header and notes, where the model was loaded
    assert err.splitlines()[-1].startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, err
    return err.splitlines()[-1]


@pytest.mark.parametrize("args, input", [(["--task", "form", "--form", "七言絕句", "--input", "春夜喜雨"], "春夜喜雨"),
                                         (["--task", "form", "--form", "七言絕句", "--title", "春夜喜雨"], "春夜喜雨"),
                                         (["--task", "acrostic", "--acrostic", "春夏秋冬"], "春夏秋冬")])
def test_task_form_with_form_asks_the_form_task(capsys, tiny_tuned, prompts_seen, args, input):
    """Before: --task form was refused without --form ("needs --form") and with it ("not --form and --task")."""
    run(capsys, "--ckpt", str(tiny_tuned), *args, "--max-new-tokens", "3")
    _, tokenizer = load(tiny_tuned)
    instruction = "請用以下題目寫一首七言絕句" if "--form" in args else TASKS["acrostic"].phrasings[0]
    assert prompts_seen == [prompt_ids(tokenizer, instruction, input)]


@pytest.mark.parametrize("args, expected", [
    (["--task", "poem", "--form", "七言絕句"], "not --form and --task"),
    (["--task", "continue", "--title", "春"], "with --task continue give --input"),
    (["--task", "form"], "--task form needs --form, one of 五言絕句, 七言絕句, 五言律詩, 七言律詩"),
    (["--base", ""], "--base is empty"),
    (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
    (["--seed", str(2**64)], "--seed must be between"),
])
def test_combinations_that_cannot_work_are_one_line(capsys, tiny_tuned, args, expected):
    err = one_line_error(capsys, "--ckpt", str(tiny_tuned), *args)
    assert expected in err


def test_an_input_too_long_for_the_block_is_refused_saying_the_limit(capsys, tiny_tuned, prompts_seen):
    """Before: the prompt was cropped from the front without a word, <INS> and the instruction first."""
    err = one_line_error(capsys, "--ckpt", str(tiny_tuned), "--task", "title", "--input", "床前明月光，" * 20)
    first = TASKS["title"].phrasings[0]
    _, tokenizer = load(tiny_tuned)
    room = 96 - 1 - len(prompt_ids(tokenizer, first, ""))
    assert "--input: the prompt is 133 tokens" in err and "at most 96 (its block_size)" in err
    assert f"shorten the input to at most {room} tokens" in err
    assert prompts_seen == []


def test_an_answer_stops_where_the_block_ends_and_says_so(capsys, monkeypatch, tiny_tuned):
    """Before: past the block the window slid on, and the model answered without its instruction in view."""
    limits = []
    monkeypatch.setattr(GPT, "generate_stream", lambda self, prompts, max_new_tokens, **kwargs:
                        limits.append((len(prompts[0]), max_new_tokens)) or iter([torch.tensor([5])] * max_new_tokens))
    _, err = run(capsys, "--ckpt", str(tiny_tuned), "--title", "春夜喜雨", "--max-new-tokens", "500")
    [(prompt, limit)] = limits
    assert prompt + limit == 96
    assert "[no end-of-text: cut at the model's block_size 96" in err


def test_an_over_long_typed_line_is_said_and_skipped(capsys, monkeypatch, tiny_tuned, prompts_seen):
    monkeypatch.setattr("sys.stdin", io.StringIO("春" * 95 + "\n春夜\n\n"))
    _, err = run(capsys, "--ckpt", str(tiny_tuned), "--max-new-tokens", "3")
    assert "error: this line: the prompt is" in err and err.count("title> ") == 3
    assert prompts_seen == [title_ids(tiny_tuned, "春夜")]


def test_an_instruction_no_input_fits_is_refused_before_the_first_line(capsys, monkeypatch, tiny_tuned):
    monkeypatch.setattr("sys.stdin", io.StringIO("春夜\n\n"))
    err = one_line_error(capsys, "--ckpt", str(tiny_tuned), "--instruction", "寫" * 100)
    assert "alone is 103 tokens" in err and "give a shorter --instruction" in err and "title> " not in err


def test_a_raw_prompt_longer_than_the_block_is_noted(capsys, tiny_pretrained):
    _, err = run(capsys, "--ckpt", str(tiny_pretrained), "--prompt", "春" * 100, "--max-new-tokens", "2")
    assert "note: the prompt is 100 tokens; the model reads only the last 96 (its block_size)" in err


def test_base_for_a_checkpoint_without_adapters_is_refused(capsys, tiny_tuned, tiny_pretrained, prompts_seen):
    """Before: --base was ignored without a word."""
    err = one_line_error(capsys, "--ckpt", str(tiny_tuned), "--base", str(tiny_pretrained), "--title", "春")
    assert f"--base {tiny_pretrained}: --ckpt {tiny_tuned} holds no LoRA adapters" in err and "drop --base" in err
    assert prompts_seen == []


def test_a_base_that_is_a_folder_is_named_so(capsys, tmp_path, tiny_tuned):
    """Before: "--base DIR does not exist", of a folder that does."""
    (tmp_path / "gone").mkdir()
    adapters = write_adapters(tmp_path / "lora.pt", tiny_tuned, recorded_base=tmp_path / "gone" / "base.pt")
    err = one_line_error(capsys, "--ckpt", str(adapters), "--base", str(tmp_path), "--title", "春")
    assert f"--base {tmp_path} is a folder, not a checkpoint file" in err


def test_a_checkpoint_of_an_unknown_kind_is_one_line(capsys, tmp_path, tiny_tuned):
    """Before: sample.py ran it as a base model (any kind not sft or dpo), or evaluate crashed on a non-string kind."""
    ckpt = load_checkpoint(tiny_tuned)
    ckpt["kind"] = 3
    torch.save(ckpt, tmp_path / "odd.pt")
    err = one_line_error(capsys, "--ckpt", str(tmp_path / "odd.pt"), "--title", "春")
    assert "unknown checkpoint kind 3" in err

"""A chat model: finetune.py --format chat end to end (the tokenizer and model grown once, the
two masks, resume, flags that do not go with it refused in one line), the commands that ask
in the instruction format refusing it, and sample.py asking it and talking with it (--chat)."""

from __future__ import annotations

import io
import json

import pytest
import torch

import finetune
import sample
from data.chat import render_ids
from data.conversations import request_text
from data.instruct import INSTRUCTION
from data.tokenizer import ASSISTANT, CHAT_MARKERS, END, SYSTEM, USER
from model import GPT
from tanggpt.checkpoint import load_checkpoint, model_and_tokenizer
from tests.test_finetune import run_error, tune


@pytest.mark.slow
def test_a_chat_run_grows_the_vocabulary_once_and_resumes_as_chat(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--format", "chat", "--max-iters", "3",
                       "--eval-interval", "3"))
    out = capsys.readouterr().out
    assert "loss on every assistant turn" in out and " conversations, " in out and "with a system prompt" in out
    gallery = (tmp_path / "sft.samples.txt").read_text(encoding="utf-8")  # a turn ends at <|end|>
    assert "[ended with <|end|>]" in gallery or "[no <|end|>: cut" in gallery
    assert "<|endoftext|>]" not in gallery
    base = torch.load(tiny_pretrained, weights_only=True)
    ckpt = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert ckpt["format"] == "chat" and ckpt["loss_on"] == "assistant"
    assert ckpt["tokenizer"] == {**base["tokenizer"], "chat_markers": True}
    rows = next(v for k, v in ckpt["model"].items() if k.endswith("wte.weight"))
    old_rows = next(v for k, v in base["model"].items() if k.endswith("wte.weight"))
    assert rows.shape[0] == old_rows.shape[0] + len(CHAT_MARKERS) == ckpt["model_config"]["vocab_size"]
    records = [json.loads(line) for line in (tmp_path / "sft.log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [3]
    # Resumed with no flags but the run's: still the chat format, the vocabulary not grown again.
    finetune.main(tune(tmp_path, small_poems, None, "--resume", "--max-iters", "4"))
    again = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert again["step"] == 4 and again["format"] == "chat" and again["tokenizer"] == ckpt["tokenizer"]
    assert next(v for k, v in again["model"].items() if k.endswith("wte.weight")).shape == rows.shape
    # A chat model tuned on as a chat model keeps its markers, and grows nothing.
    finetune.main(tune(tmp_path, small_poems, tmp_path / "sft.pt", "--format", "chat", "--loss-on", "last",
                       "--max-iters", "1", "--out", str(tmp_path / "more.pt")))
    more = torch.load(tmp_path / "more.pt", weights_only=True)
    assert more["tokenizer"] == ckpt["tokenizer"] and more["loss_on"] == "last"


@pytest.mark.parametrize("args, message", [
    (["--loss-on", "last"], "--loss-on last is not a mask of --format instruct; give response or all"),
    (["--format", "chat", "--loss-on", "response"], "--loss-on response is not a mask of --format chat; give "
                                                     "assistant or last"),
    (["--format", "chat", "--data", "x.jsonl"], "--data records are instruction-format samples"),
    (["--format", "chat", "--lora-rank", "4"], "--format chat tunes every weight"),
    (["--format", "dialogue"], "--format"),
])
def test_flags_that_do_not_go_with_the_format_are_refused(tmp_path, small_poems, tiny_pretrained, capsys, args,
                                                          message):
    assert message in run_error(tune(tmp_path, small_poems, tiny_pretrained, *args), capsys)


@pytest.mark.parametrize("command, flag", [("align", "--init"), ("rl", "--init"), ("rejection_sampling", "--init")])
def test_commands_that_ask_in_the_instruction_format_refuse_a_chat_model(tmp_path, small_poems, tiny_chat, capsys,
                                                                         command, flag):
    module = __import__(command)
    with pytest.raises(SystemExit) as exit_info:
        module.main([flag, str(tiny_chat), "--poems", str(small_poems), "--out", str(tmp_path / "out.jsonl")]
                    if command == "rejection_sampling" else
                    [flag, str(tiny_chat), "--poems", str(small_poems), "--out", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: {flag} {tiny_chat} was tuned on conversations (finetune.py --format "
                                    f"chat), and {command}.py asks in the instruction format: give a model tuned "
                                    "without --format chat, or talk to this one with sample.py")


# -----------------------------------------------------------------------------
# sample.py: a chat model asked one request, and talked with (--chat)


def chat_run(capsys, monkeypatch, argv: list[str], stdin: str | None = None) -> tuple[str, str, list[list[int]]]:
    """sample.main(argv) on the CPU, with `stdin` typed; its output and the prompt of each generation."""
    seen = []
    original = GPT.generate_stream

    def spy(self, prompts, *args, **kwargs):
        seen.append(list(prompts[0]))
        return original(self, prompts, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate_stream", spy)
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    sample.main([*argv, "--device", "cpu", "--dtype", "float32"])
    captured = capsys.readouterr()
    return captured.out, captured.err, seen


def chat_tokenizer_of(path):
    return model_and_tokenizer(load_checkpoint(path, "--ckpt"))[1]


def test_a_chat_model_is_asked_as_the_users_turn(capsys, monkeypatch, tiny_chat):
    _, _, seen = chat_run(capsys, monkeypatch, ["--ckpt", str(tiny_chat), "--title", "春夜", "--system", "你只寫五言詩",
                                                "--max-new-tokens", "5"])
    tokenizer = chat_tokenizer_of(tiny_chat)
    assert seen == [render_ids(tokenizer, [{"role": "system", "content": "你只寫五言詩"},
                                           {"role": "user", "content": request_text(INSTRUCTION, "春夜")}],
                               add_generation_prompt=True)]


def test_chat_carries_the_conversation_and_reset_forgets_it(capsys, monkeypatch, tiny_chat):
    _, err, seen = chat_run(capsys, monkeypatch, ["--ckpt", str(tiny_chat), "--chat", "--max-new-tokens", "6"],
                            "春夜\n秋思\n/reset\n冬夜\n\n")
    tokenizer = chat_tokenizer_of(tiny_chat)
    assert len(seen) == 3 and "[a new conversation]" in err
    assert seen[0] == render_ids(tokenizer, [{"role": "user", "content": "春夜"}], add_generation_prompt=True)
    # The second turn is read after the first exchange: the first prompt, its answer, <|end|>, the new turn.
    assert seen[1][: len(seen[0])] == seen[0]
    assert tokenizer.decode(seen[1]).endswith(f"{END}{USER}秋思{END}{ASSISTANT}")
    assert seen[2] == render_ids(tokenizer, [{"role": "user", "content": "冬夜"}], add_generation_prompt=True)


def test_a_conversation_that_outgrows_the_block_forgets_its_oldest_exchanges(capsys, monkeypatch, tiny_chat):
    # block 96, answers of at most 20 tokens: a prompt keeps 12 free (reserved_for_answer), so it may hold 84;
    # each user turn here is 38 with its markers, and the system prompt 5: two never fit with an answer.
    line = "春" * 36
    _, err, seen = chat_run(capsys, monkeypatch, ["--ckpt", str(tiny_chat), "--chat", "--system", "是詩人",
                                                  "--max-new-tokens", "20"], f"{line}\n{line}\n{'春' * 90}\n秋\n\n")
    tokenizer = chat_tokenizer_of(tiny_chat)
    assert "the oldest 1 exchange forgotten]" in err
    assert all(len(ids) <= 84 for ids in seen) and len(seen) == 3  # the 90-character line was refused, alone
    assert "error: the request is" in err
    assert tokenizer.decode(seen[1]).startswith(f"{SYSTEM}是詩人{END}{USER}{line}{END}{ASSISTANT}")
    assert tokenizer.decode(seen[1]).count(line) == 1  # the first exchange forgotten, the system prompt kept


@pytest.mark.parametrize("args, message", [
    (["--chat"], "error: --chat: {ckpt} was not tuned on conversations"),
    (["--system", "你是詩人", "--title", "春"], "error: --system: {ckpt} was not tuned on conversations"),
    (["--chat", "--title", "春"], "error: --chat is a conversation you type, turn by turn; ask without --title"),
    (["--chat", "--num-samples", "2"], "error: --chat is a conversation you type, turn by turn; ask without "
                                        "--num-samples"),
])
def test_chat_flags_are_checked_in_one_line(capsys, tiny_tuned, args, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(tiny_tuned), *args, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines()[-1].startswith(message.format(ckpt=tiny_tuned))


def test_a_chat_run_writes_ckpt_chat_unless_told_otherwise(tmp_path, small_poems, monkeypatch, capsys):
    """The chat model does not take the instruction-tuned model's default path (ckpt_sft.pt)."""
    monkeypatch.chdir(tmp_path)
    assert "no checkpoint at ckpt_chat.pt" in run_error(["--resume", "--format", "chat", "--poems", str(small_poems)],
                                                        capsys)
    assert "no checkpoint at ckpt_sft.pt" in run_error(["--resume", "--poems", str(small_poems)], capsys)

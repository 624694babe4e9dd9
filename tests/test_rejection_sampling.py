"""Rejection sampling (rejection_sampling.py): the best answer of each group, records finetune.py
reads, an interrupted run continued to the same answers, bad flags one line each."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import finetune
import rejection_sampling
import tanggpt.rollouts
from data.instruct import load_instruction_jsonl
from tanggpt.rewards import Reward
from tanggpt.rollouts import Request, Rollout, best_of_groups
from tests.test_reliability import one_line_error


def answer(text: str, total: float, stopped: bool = True) -> Rollout:
    return Rollout(Request("poem", "請用以下題目寫一首詩", "春夜喜雨"), [], text, stopped,
                   Reward(total, {}))


def test_the_best_of_a_group_is_the_highest_reward_among_the_answers_that_stopped():
    first = [answer("a", 0.4), answer("b", 0.9, stopped=False), answer("c", 0.7), answer("d", 0.7)]
    none_stopped = [answer("e", 0.9, stopped=False), answer("f", 1.0, stopped=False)] * 2
    low = [answer("g", 0.2), answer("h", 0.3), answer("i", 0.1), answer("j", 0.0)]
    best = best_of_groups(first + none_stopped + low, 4, min_reward=0.25)
    # cut off mid-poem, b is no target however it scored; c and d tie: the first is kept
    assert [b.text if b else None for b in best] == ["c", None, "h"]
    assert best_of_groups(low, 4, min_reward=0.5) == [None]


QUATRAIN = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
LUSHI = QUATRAIN + "\n" + QUATRAIN


def test_with_same_shape_the_best_is_of_the_first_answers_shape():
    group = [answer(QUATRAIN, 0.6), answer(LUSHI, 1.0), answer(QUATRAIN, 0.8), answer(LUSHI, 0.9)]
    assert best_of_groups(group, 4)[0].reward.total == 1.0
    # the policy drew a quatrain first: the best quatrain is kept, however well a 律詩 scored
    assert best_of_groups(group, 4, same_shape=True)[0].reward.total == 0.8


@pytest.fixture(scope="module")
def stopping_tuned(tmp_path_factory, small_poems, tiny_pretrained) -> Path:
    """The tiny model tuned on two-line answers until it stops: answers that can be kept."""
    folder = tmp_path_factory.mktemp("stopping")
    records = [{"instruction": instruction, "input": "春夜喜雨", "output": "好雨知時節\n當春乃發生"}
               for instruction in ("請用以下題目寫一首詩", "請寫一首藏頭詩", "請續寫這首詩", "請寫一首五言絕句")]
    (folder / "short.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                        encoding="utf-8")
    out = folder / "ckpt_sft.pt"
    finetune.main(["--init", str(tiny_pretrained), "--poems", str(small_poems), "--data",
                   str(folder / "short.jsonl"), "--data-mode", "replace", "--out", str(out), "--dtype", "float32",
                   "--batch-size", "4", "--epochs", "60", "--eval-interval", "60", "--warmup-iters", "2",
                   "--lr", "3e-3", "--sample-tokens", "4"])
    return out


def rs_argv(tmp_path: Path, poems: Path, init: Path, *extra: str, out: str = "best.jsonl") -> list[str]:
    return ["--init", str(init), "--poems", str(poems), "--out", str(tmp_path / out), "--dtype", "float32",
            "--prompts", "6", "--chunk-prompts", "2", "--samples-per-prompt", "4", "--max-new-tokens", "40",
            "--min-reward", "0", *extra]


def test_the_kept_answers_are_records_finetune_tunes_on(tmp_path, small_poems, stopping_tuned, capsys):
    out = rejection_sampling.main(rs_argv(tmp_path, small_poems, stopping_tuned))
    records = load_instruction_jsonl(out)
    assert 1 <= len(records) <= 6  # at most one per prompt
    printed = capsys.readouterr().out
    assert "kept" in printed and "reward, best" in printed
    assert not Path(f"{out}.partial").exists()  # the progress file goes once --out is whole
    finetune.main(["--init", str(stopping_tuned), "--poems", str(small_poems), "--data", str(out), "--data-mode",
                   "replace", "--out", str(tmp_path / "rs.pt"), "--dtype", "float32", "--batch-size", "2",
                   "--max-iters", "2", "--sample-tokens", "4"])
    assert (tmp_path / "rs.pt").exists()


def test_an_interrupted_run_continues_to_the_same_answers(tmp_path, small_poems, stopping_tuned, monkeypatch):
    straight = rejection_sampling.main(rs_argv(tmp_path, small_poems, stopping_tuned, out="a.jsonl"))
    calls = []
    real_roll_out = tanggpt.rollouts.roll_out

    def roll_out_then_sigterm(*args, **kwargs):  # SIGTERM arrives while the second chunk is sampled
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_roll_out(*args, **kwargs)

    monkeypatch.setattr(rejection_sampling, "roll_out", roll_out_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        rejection_sampling.main(rs_argv(tmp_path, small_poems, stopping_tuned, out="b.jsonl"))
    assert stopped.value.code == 128 + signal.SIGTERM
    partial = tmp_path / "b.jsonl.partial"
    assert len(partial.read_text(encoding="utf-8").splitlines()) == 1 + 2  # the key, then the two chunks done
    assert not (tmp_path / "b.jsonl").exists()
    with partial.open("ab") as f:
        f.write(b'{"chunk": 2, "rec')  # and a line a kill cut short: dropped, its chunk sampled again
    monkeypatch.setattr(rejection_sampling, "roll_out", real_roll_out)
    resumed = rejection_sampling.main(rs_argv(tmp_path, small_poems, stopping_tuned, out="b.jsonl"))
    assert resumed.read_bytes() == straight.read_bytes()


def test_a_progress_file_of_other_settings_is_not_continued(tmp_path, small_poems, stopping_tuned, capsys):
    argv = rs_argv(tmp_path, small_poems, stopping_tuned)
    Path(f"{tmp_path / 'best.jsonl'}.partial").write_text('{"key": {"seed": 1}}\n{"chunk": 0, "records": []}\n')
    rejection_sampling.main(argv)
    assert "other settings" in capsys.readouterr().out
    assert len(load_instruction_jsonl(tmp_path / "best.jsonl")) >= 1


@pytest.mark.parametrize("args, expected", [
    (["--min-reward", "1.5"], "--min-reward must be in [0, 1]"),
    (["--samples-per-prompt", "0"], "--samples-per-prompt must be positive"),
    (["--tasks", "title"], "--tasks 'title'"),
    (["--out", "best.txt"], "give a .jsonl path"),
    (["--acrostic-weight", "-1"], "--acrostic-weight must not be negative"),
    (["--max-new-tokens", "200"], "no alignment-split prompt leaves --max-new-tokens 200"),
])
def test_bad_flags_are_one_line(tmp_path, small_poems, stopping_tuned, capsys, args, expected):
    err = one_line_error(rejection_sampling.main, rs_argv(tmp_path, small_poems, stopping_tuned, *args), capsys)
    assert expected in err


def test_an_existing_out_or_an_out_that_is_an_input_is_refused(tmp_path, small_poems, stopping_tuned, tiny_pretrained,
                                                                 capsys):
    (tmp_path / "best.jsonl").write_text("kept\n")
    err = one_line_error(rejection_sampling.main, rs_argv(tmp_path, small_poems, stopping_tuned), capsys)
    assert "exists" in err and "--overwrite" in err
    assert (tmp_path / "best.jsonl").read_text() == "kept\n"
    argv = rs_argv(tmp_path, small_poems, tiny_pretrained, out="x.jsonl")
    err = one_line_error(rejection_sampling.main, argv, capsys)
    assert "pretrain" in err and "finetune.py" in err

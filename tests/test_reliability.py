"""Nothing lost, ever: what --resume restores, what is never overwritten, what a signal saves,
and one clear line for every bad input, checked before any long work starts.

Numbered as the classes of faults in docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.corpus import load_corpus
from data.tokenizer import CharTokenizer
import evaluate
import finetune
from model import GPT, GPTConfig
import pretrain
from tanggpt.checkpoint import CheckpointError, load_checkpoint
from tanggpt.device import setup_runtime
from tanggpt.training import Stage, TrainConfig, TrainingDiverged, train
from tests.conftest import REPO_ROOT, TINY

SCRIPT = [sys.executable, str(REPO_ROOT / "pretrain.py")]


def pretrain_argv(out: Path, poems: Path, *args: str) -> list[str]:
    return ["--poems", str(poems), "--out", str(out), *TINY, *args]


def tune_argv(out: Path, poems: Path, init: Path, *args: str) -> list[str]:
    return ["--init", str(init), "--poems", str(poems), "--out", str(out), "--dtype", "float32", "--batch-size", "8",
            "--warmup-iters", "2", "--sample-titles", "春夜喜雨", "--sample-tokens", "8", *args]


def one_line_error(main, argv: list[str], capsys) -> str:
    """main(argv) must exit 2 with one `error:` line on stderr and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -----------------------------------------------------------------------------
# 1. --resume continues the run with its own settings


@pytest.mark.slow
def test_resume_restores_the_runs_settings_not_todays_defaults(tmp_path, small_poems, capsys):
    out = tmp_path / "ckpt.pt"
    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "4", "--eval-interval", "2", "--lr", "5e-4",
                                "--batch-size", "3", "--log-interval", "1"))
    capsys.readouterr()
    # Only --resume and a longer run: model, batch, lr, precision, intervals all come from the checkpoint.
    pretrain.main(["--poems", str(small_poems), "--out", str(out), "--resume", "--max-iters", "6"])
    printed = capsys.readouterr().out
    assert "note: --max-iters 6 (the run was started with 4)" in printed
    assert "3 x 32 x 1 accumulation" in printed and "steps 4 -> 6" in printed and "2 layers" in printed
    ckpt = torch.load(out, weights_only=True)
    run = ckpt["train_config"]
    assert (ckpt["step"], run["batch_size"], run["lr"], run["compile"], run["dtype"]) == (6, 3, 5e-4, False, "float32")
    assert ckpt["tokens_seen"] == 6 * 3 * 32
    assert [r["step"] for r in records(tmp_path / "ckpt.log.jsonl") if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_resume_of_a_finished_run_says_there_is_nothing_to_do(tmp_path, small_poems, tiny_pretrained, capsys):
    out = tmp_path / "sft.pt"
    finetune.main(tune_argv(out, small_poems, tiny_pretrained, "--max-iters", "3"))
    before = out.read_bytes()
    capsys.readouterr()
    # Today's defaults would be 2 epochs of a few hundred steps; the run was 3 steps, and is done.
    assert finetune.main(["--poems", str(small_poems), "--out", str(out), "--resume"]) == {}
    printed = capsys.readouterr().out
    assert "nothing to do: the run at" in printed and "finished at step 3 of 3" in printed
    assert out.read_bytes() == before


@pytest.mark.slow
def test_resume_refuses_a_finetune_flag_that_changes_the_samples(tmp_path, small_poems, tiny_pretrained, capsys):
    out = tmp_path / "sft.pt"
    finetune.main(tune_argv(out, small_poems, tiny_pretrained, "--max-iters", "2"))
    err = one_line_error(finetune.main, ["--poems", str(small_poems), "--out", str(out), "--resume", "--loss-on",
                                         "all", "--max-iters", "4"], capsys)
    assert "--loss-on all: the run at" in err and "was started with 'response'" in err


# -----------------------------------------------------------------------------
# 2. No run overwrites another run's files unless asked


@pytest.mark.slow
def test_a_new_run_never_clobbers_an_existing_one(tmp_path, small_poems, capsys):
    out = tmp_path / "ckpt.pt"
    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "2", "--eval-interval", "2"))
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(files) == {"ckpt.pt", "ckpt.log.jsonl", "ckpt.loss.png", "ckpt.samples.txt"}
    err = one_line_error(pretrain.main, pretrain_argv(out, small_poems, "--max-iters", "3"), capsys)
    assert "a run is already there (ckpt.pt, ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt)" in err
    assert "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # untouched

    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "3", "--eval-interval", "3", "--overwrite"))
    assert ("--overwrite: the previous run's ckpt.pt, ckpt.log.jsonl, ckpt.loss.png, ckpt.samples.txt will be "
            "replaced") in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["step"] == 3
    assert [r["step"] for r in records(tmp_path / "ckpt.log.jsonl") if "val_loss" in r] == [3]  # a fresh log


def test_finetune_out_equal_to_init_is_refused(tmp_path, small_poems, tiny_pretrained, capsys):
    copy = tmp_path / "ckpt.pt"
    copy.write_bytes(tiny_pretrained.read_bytes())
    for args in ([], ["--overwrite"]):
        err = one_line_error(finetune.main, tune_argv(copy, small_poems, copy, *args), capsys)
        assert f"--out {copy} is also --init: the run would write over one of its own inputs" in err
    assert copy.read_bytes() == tiny_pretrained.read_bytes()


# -----------------------------------------------------------------------------
# 3. A diverged update is never saved


class SyntheticStage(Stage):
    """Random token batches, a loss and an evaluation a test passes in."""

    def __init__(self, loss, evaluate=lambda model: {"val_loss": 1.0}, max_val_loss=math.inf):
        self.loss_fn, self.evaluate_fn, self.max_val_loss = loss, evaluate, max_val_loss
        self.kind, self.tokenizer, self.plot_title = "test", CharTokenizer("abc"), "test"

    def get_batch(self, step, micro_step):
        x = torch.randint(20, (4, 8), generator=torch.Generator().manual_seed(step))
        return x, x

    def loss(self, model, batch):
        return self.loss_fn(model, batch)

    def evaluate(self, model):
        return self.evaluate_fn(model)

    def sample(self, model, step):
        return ""


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))


def test_weights_that_blew_up_are_caught_before_the_save(tmp_path):
    def poisoned(model, batch):  # a finite loss whose gradient is not: the update makes the weights NaN
        w = model.lm_head.weight
        return model(*batch)[1] + (w - w.detach()).abs().sqrt().sum()

    config = TrainConfig(out=str(tmp_path / "c.pt"), warmup_iters=0, grad_clip=0, eval_interval=1, log_interval=100)
    with pytest.raises(TrainingDiverged, match=r"step 1: the weights are no longer finite numbers; stopping, no "
                                               r"checkpoint was written"):
        train(tiny_model(), config, SyntheticStage(poisoned), setup_runtime("cpu", "float32"), max_iters=3)
    assert not (tmp_path / "c.pt").exists()


def test_a_validation_loss_far_above_chance_is_never_saved(tmp_path):
    """Weights can stay finite while the model is ruined (val loss 1.7e12 was seen): that is divergence too."""
    losses = iter([2.0, 1.7e12])
    config = TrainConfig(out=str(tmp_path / "c.pt"), warmup_iters=0, eval_interval=2, log_interval=100)
    stage = SyntheticStage(lambda model, batch: model(*batch)[1], evaluate=lambda model: {"val_loss": next(losses)},
                            max_val_loss=2 * math.log(20))
    with pytest.raises(TrainingDiverged, match=r"step 4: validation loss is 1.7e\+12; stopping, the last good "
                                               r"checkpoint \(.*c.pt, step 2\) is untouched"):
        train(tiny_model(), config, stage, setup_runtime("cpu", "float32"), max_iters=6)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 2


# -----------------------------------------------------------------------------
# 4. Output problems surface before any work


def inside_a_file(tmp: Path) -> Path:
    (tmp / "file.txt").write_text("x")
    return tmp / "file.txt" / "ckpt.pt"  # its folder is a file: it cannot be made


@pytest.mark.parametrize("make_out, message", [(lambda tmp: tmp, "is a folder; give a checkpoint file"),
                                               (inside_a_file, "cannot make the folder")])
def test_an_unusable_out_fails_before_the_corpus_loads(tmp_path, capsys, make_out, message):
    # --poems does not exist: had the corpus been read first, that would be the error.
    err = one_line_error(pretrain.main, ["--out", str(make_out(tmp_path)), "--poems", str(tmp_path / "none")], capsys)
    assert message in err and "--out" in err


def test_an_out_folder_that_cannot_be_written_fails_before_the_corpus_loads(tmp_path, capsys, monkeypatch):
    def refuse(self, data):  # as a read-only or full disk would (root ignores permission bits, so fake it)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    err = one_line_error(pretrain.main, ["--out", str(tmp_path / "ckpt.pt"), "--poems", str(tmp_path / "none")], capsys)
    assert err == f"error: --out {tmp_path / 'ckpt.pt'}: cannot write in {tmp_path} (Permission denied)"


# -----------------------------------------------------------------------------
# 5. Interrupted is not finished: SIGTERM saves like Ctrl-C, and the exit code says so


def wait_for_log(log: Path, lines: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= lines):
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_exits_143(tmp_path, small_poems):
    out = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([*SCRIPT, *pretrain_argv(out, small_poems, "--max-iters", "400", "--eval-interval", "500",
                                                     "--log-interval", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(tmp_path / "ckpt.log.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    step = torch.load(out, weights_only=True)["step"]
    assert 5 <= step < 400
    assert f"interrupted: saved {out} at step {step} of 400; continue with --resume" in stderr
    assert "next:" not in stdout + stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_ctrl_c_during_setup_is_one_line_and_130(tmp_path):
    """Interrupted while the corpus is read and encoded: nothing to save, no traceback."""
    corpus = Path(os.environ.get("POEMS_DIR", REPO_ROOT.parent / "shared" / "corpus" / "quan-tang-shi"))
    proc = subprocess.Popen([*SCRIPT, "--poems", str(corpus), "--out", str(tmp_path / "c.pt"), *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line as soon as it is printed
    line = proc.stdout.readline()  # the cleaning summary: the corpus is loaded, the tokenizer is being built
    assert line.startswith("corpus:")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr and "[stopped]" in stderr
    assert not (tmp_path / "c.pt").exists()


# -----------------------------------------------------------------------------
# 6. Every bad input is one line, before any data loads


@pytest.mark.parametrize("main, argv, message", [
    (pretrain.main, ["--n-embd", "30", "--n-head", "4"], "--n-embd (30) must be divisible by --n-head (4)"),
    (pretrain.main, ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (pretrain.main, ["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (pretrain.main, ["--tokenizer", "nope"], "--tokenizer nope: unknown; use 'char' or one of"),
    (finetune.main, ["--init", "x.pt", "--batch-size", "0"], "--batch-size must be positive"),
    (finetune.main, ["--init", "x.pt", "--epochs", "0"], "--epochs must be positive"),
    (evaluate.main, ["--temperature", "hot"], "argument --temperature: invalid float value: 'hot'"),
    (evaluate.main, ["--top-k", "1.5"], "argument --top-k: invalid int value: '1.5'"),
])
def test_bad_values_are_one_line_before_anything_loads(tmp_path, capsys, main, argv, message):
    err = one_line_error(main, [*argv, "--poems", str(tmp_path / "none"), "--out", str(tmp_path / "o.pt")]
                         if main is not evaluate.main else [*argv, "--poems", str(tmp_path / "none")], capsys)
    assert message in err


def test_data_file_that_is_not_utf8_is_one_line(tmp_path, tiny_pretrained, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes('{"instruction": "寫", "input": "甲", "output": "乙"}\n'.encode() +
                     '{"instruction": "寫", "input": "丙", "output": "丁"}\n'.encode("big5"))
    err = one_line_error(finetune.main, tune_argv(tmp_path / "s.pt", tmp_path / "none", tiny_pretrained,
                                                  "--data", str(data)), capsys)
    assert f"--data {data}:2: not UTF-8 text" in err  # named before the (missing) corpus is read


# -----------------------------------------------------------------------------
# 7. Records dropped for a reason say so


def test_ci_records_are_counted_under_their_own_name(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shi = [{"title": f"詩{i}", "paragraphs": ["白日依山盡，黃河入海流。"]} for i in range(3)]
    ci = [{"rhythmic": "浣溪沙", "author": "韋莊", "paragraphs": [f"清曉妝成寒食天{i}"]} for i in range(5)]
    (folder / "a.json").write_text(json.dumps(shi, ensure_ascii=False), encoding="utf-8")
    (folder / "ci.json").write_text(json.dumps(ci, ensure_ascii=False), encoding="utf-8")
    load_corpus(folder)
    out = capsys.readouterr().out
    assert "5 ci (詞) records with 'rhythmic' instead of 'title' (not supported)" in out
    assert "empty title" not in out


# -----------------------------------------------------------------------------
# 8. The smaller ones


@pytest.mark.slow
def test_a_partial_last_log_line_does_not_block_resume(tmp_path, small_poems, capsys):
    out = tmp_path / "ckpt.pt"
    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "2", "--eval-interval", "2", "--log-interval", "1"))
    with open(tmp_path / "ckpt.log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "tok')  # a write a kill cut short
    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "4", "--eval-interval", "2", "--log-interval", "1",
                                "--resume"))
    assert [r["step"] for r in records(tmp_path / "ckpt.log.jsonl") if "train_loss" in r] == [1, 2, 3, 4]


def test_a_checkpoint_without_training_state_cannot_resume(tmp_path, small_poems, tiny_pretrained, capsys):
    ckpt = torch.load(tiny_pretrained, weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    err = one_line_error(pretrain.main, pretrain_argv(tmp_path / "ckpt.pt", small_poems, "--resume"), capsys)
    assert "holds a model but not the training state a run resumes from (no optimizer)" in err


@pytest.mark.slow
def test_a_stray_partial_save_is_removed(tmp_path, small_poems, capsys):
    stray = tmp_path / ".ckpt.pt.tmp-99999"
    stray.write_bytes(b"PK half a zip")
    pretrain.main(pretrain_argv(tmp_path / "ckpt.pt", small_poems, "--max-iters", "2", "--eval-interval", "2"))
    assert not stray.exists() and f"removed {stray}, a partial save" in capsys.readouterr().out


def test_unreadable_checkpoint_reason_is_cut_at_a_word(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    path.write_bytes(b"x")
    words = " ".join(f"word{i}" for i in range(100))

    def failing_load(*args, **kwargs):
        raise RuntimeError(words)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, "--ckpt")
    reason = str(info.value).split("(truncated or not one): ")[1]
    assert reason.endswith(" …") and len(reason) < 200
    kept = reason.removesuffix(" …").split(" ")
    assert kept == words.split(" ")[: len(kept)]  # whole words, none cut in the middle


def test_eval_poems_errors_name_eval_poems(tmp_path, tiny_tuned, capsys):
    # --poems does not exist either: --eval-poems is checked first, before the corpus loads.
    err = one_line_error(evaluate.main, ["--ckpt", str(tiny_tuned), "--poems", str(tmp_path / "none"), "--eval-poems",
                                         "nowhere"], capsys)
    assert err == "error: --eval-poems nowhere: folder does not exist"

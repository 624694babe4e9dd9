"""pretrain.py end to end on a small slice of the corpus, with a tiny model.

Covers: the files a run writes, exact resume after Ctrl-C, atomic saves that survive a
kill, the NaN guard, data-parallel training on CPU, and one clear line per bad input.
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

from model import GPT, GPTConfig
import pretrain
from tanggpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tanggpt.cli import parse_config
from tanggpt.training import TrainConfig, configure_optimizer, lr_at
from tests.conftest import REPO_ROOT, TINY


def cli(tmp_path: Path, poems: Path, *args: str) -> list[str]:
    return ["--poems", str(poems), "--out", str(tmp_path / "ckpt.pt"), *TINY, *args]


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_error(argv: list[str], capsys) -> str:
    """Run pretrain.main expecting a bad-input exit: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]  # a progress bar may have been drawn before it
    assert last_line.startswith("error: ") and "Traceback" not in err, err
    return last_line


# -----------------------------------------------------------------------------
# A run and what it writes


@pytest.mark.slow
def test_run_writes_checkpoint_log_plot_and_samples(tmp_path, small_poems, capsys):
    pretrain.main(cli(tmp_path, small_poems, "--max-iters", "20", "--eval-interval", "10", "--log-interval", "5"))
    out = capsys.readouterr().out
    for header in ("device cpu, fp32", "parameters: 2 layers", "tokenizer char: vocabulary", "tokens: train",
                   "128 tokens per step", "steps 0 -> 20"):
        assert header in out, header

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain data only
    assert ckpt["kind"] == "pretrain" and ckpt["step"] == 20 and ckpt["tokens_seen"] == 20 * 4 * 32
    for key in ("model", "optimizer", "model_config", "tokenizer", "train_config", "rng", "best_val_loss"):
        assert key in ckpt, key
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["tokenizer"]["kind"] == "char"

    records = log_records(tmp_path / "ckpt.log.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [5, 10, 15, 20]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(ckpt["model_config"]["vocab_size"])
    assert math.isclose(evals[-1]["val_bpc"], evals[-1]["val_loss"] / math.log(2), rel_tol=1e-6)  # char: 1 token/char
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)

    assert (tmp_path / "ckpt.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (tmp_path / "ckpt.samples.txt").read_text(encoding="utf-8")
    assert "=== step 10\n春夜喜雨\n" in samples and "=== step 20\n春夜喜雨\n" in samples


@pytest.mark.slow
def test_help_documents_every_flag_with_its_default():
    result = subprocess.run([sys.executable, "pretrain.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--poems", "--out", "--device", "--seed", "--max-iters", "--eval-interval", "--eval-iters",
                 "--batch-size", "--block-size", "--n-layer", "--n-head", "--n-embd", "--dropout", "--lr",
                 "--min-lr", "--warmup-iters", "--grad-accum", "--compile", "--resume", "--tokenizer", "--preset"):
        assert flag in result.stdout, flag
    assert "(default: ckpt.pt)" in result.stdout
    assert "--resume continues a run with the settings it was started with" in result.stdout
    assert "--overwrite" in result.stdout


def test_gpu_preset_sets_defaults_but_explicit_flags_win():
    config, explicit = parse_config(pretrain.PretrainConfig, ["--preset", "gpu", "--n-layer", "3"], "")
    assert pretrain.resolve_config(config, explicit, None) == []
    assert config.n_embd == pretrain.PRESETS["gpu"]["n_embd"] and config.compile
    assert config.n_layer == 3


def test_gpt2_preset_is_the_run_made_before_the_speed_measurements():
    config, explicit = parse_config(pretrain.PretrainConfig, ["--preset", "gpt2", "--max-iters", "7"], "")
    pretrain.resolve_config(config, explicit, None)
    assert (config.norm, config.activation, config.positions, config.qk_norm) == ("layernorm", "gelu", "learned", False)
    assert (config.optimizer, config.batch_size, config.n_layer, config.n_embd) == ("adamw", 32, 4, 256)
    assert config.max_iters == 7  # a flag typed still wins
    default, _ = parse_config(pretrain.PretrainConfig, [], "")
    assert (default.optimizer, default.positions) == ("muon", "rope")


# -----------------------------------------------------------------------------
# Resume


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path, small_poems):
    """Ctrl-C saves a checkpoint; --resume continues with exactly the same losses."""
    steps = "300"
    common = [*TINY, "--poems", str(small_poems), "--max-iters", steps, "--eval-interval", "100",
              "--log-interval", "1", "--dropout", "0.1"]
    script = [sys.executable, str(REPO_ROOT / "pretrain.py")]
    straight = tmp_path / "straight"
    straight.mkdir()
    subprocess.run([*script, *common, "--out", str(straight / "ckpt.pt")], check=True, capture_output=True)

    broken = tmp_path / "broken"
    broken.mkdir()
    log = broken / "ckpt.log.jsonl"
    proc = subprocess.Popen([*script, *common, "--out", str(broken / "ckpt.pt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 20):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # interrupted is not finished: `pretrain.py && finetune.py` stops here
    assert "continue with --resume" in err and "next:" not in out + err and "Traceback" not in err
    interrupted_at = torch.load(broken / "ckpt.pt", weights_only=True)["step"]
    assert 20 <= interrupted_at < int(steps)

    subprocess.run([*script, *common, "--out", str(broken / "ckpt.pt"), "--resume"], check=True, capture_output=True)
    expected = [(r["step"], r["train_loss"]) for r in log_records(straight / "ckpt.log.jsonl") if "train_loss" in r]
    resumed = [(r["step"], r["train_loss"]) for r in log_records(log) if "train_loss" in r]
    assert resumed == expected
    vals = lambda path: [r["val_loss"] for r in log_records(path) if "val_loss" in r]  # noqa: E731
    assert vals(log) == vals(straight / "ckpt.log.jsonl")
    # The samples file too: no entry lost or repeated across the interruption.
    assert (broken / "ckpt.samples.txt").read_text() == (straight / "ckpt.samples.txt").read_text()


@pytest.mark.slow
def test_a_run_saved_before_the_block_choices_resumes_as_it_was_trained(tmp_path, small_poems):
    """A checkpoint written before --optimizer and the block choices existed records neither:
    it was GPT-2's block with AdamW, and resumes as that, whatever today's defaults are."""
    gpt2 = ["--norm", "layernorm", "--activation", "gelu", "--positions", "learned", "--no-qk-norm",
            "--optimizer", "adamw"]
    pretrain.main(cli(tmp_path, small_poems, *gpt2, "--max-iters", "2", "--eval-interval", "2"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    for key in ("norm", "activation", "positions", "qk_norm", "tie_head", "optimizer", "muon_lr_scale"):
        ckpt["train_config"].pop(key)
        ckpt["model_config"].pop(key, None)
    save_checkpoint(tmp_path / "ckpt.pt", ckpt)
    pretrain.main(cli(tmp_path, small_poems, "--resume", "--max-iters", "4"))
    resumed = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 4 and resumed["train_config"]["optimizer"] == "adamw"
    assert resumed["model_config"]["positions"] == "learned" and resumed["model_config"]["norm"] == "layernorm"


@pytest.mark.slow
def test_atomic_save_survives_a_kill_mid_save(tmp_path):
    """SIGKILL while the new checkpoint is being written leaves the old one loadable."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(10.0)})
    child = f"""
import os, sys, time, torch
sys.path.insert(0, {str(REPO_ROOT)!r})
from tanggpt import checkpoint
real_save = torch.save
def slow_save(obj, f):
    f.write(b"PK\\x03\\x04 half a zip archive")
    f.flush()
    open({str(tmp_path / 'writing')!r}, 'w').close()
    time.sleep(60)
torch.save = slow_save
checkpoint.save_checkpoint({str(path)!r}, {{"step": 2, "weights": torch.zeros(10)}})
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert (tmp_path / "writing").exists()
    proc.kill()
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 1 and torch.equal(ckpt["weights"], torch.arange(10.0))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, small_poems, capsys):
    pretrain.main(cli(tmp_path, small_poems, "--max-iters", "4", "--eval-interval", "4"))
    before = (tmp_path / "ckpt.pt").read_bytes()
    capsys.readouterr()
    err = run_error(cli(tmp_path, small_poems, "--max-iters", "40", "--eval-interval", "30", "--resume",
                        "--lr", "1e30", "--min-lr", "1e29", "--warmup-iters", "0", "--grad-clip", "0",
                        "--log-interval", "1"), capsys)
    assert "training loss is nan" in err or "training loss is inf" in err
    step = int(err.split("step ")[1].split(":")[0])
    assert 4 < step < 30
    assert f"the last good checkpoint ({tmp_path / 'ckpt.pt'}, step 4) is untouched" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# -----------------------------------------------------------------------------
# Data parallel on CPU


@pytest.mark.slow
def test_ddp_on_cpu_trains_and_only_rank_0_writes(tmp_path, small_poems):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO_ROOT / "pretrain.py"), *cli(tmp_path, small_poems, "--max-iters", "6", "--eval-interval", "6",
                                              "--log-interval", "2", "--device", "cpu")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("device cpu, fp32, 2 processes") == 1  # one header: rank 0 alone prints
    assert "256 tokens per step (4 x 32 x 1 accumulation x 2 processes)" in result.stdout
    records = log_records(tmp_path / "ckpt.log.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 6]  # each step logged once
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["tokens_seen"] == 6 * 256


# -----------------------------------------------------------------------------
# Bad input: one clear line each


def test_resume_without_a_checkpoint(tmp_path, small_poems, capsys):
    err = run_error(cli(tmp_path, small_poems, "--resume"), capsys)
    assert "--resume: no checkpoint at" in err


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint(tmp_path, small_poems, capsys):
    pretrain.main(cli(tmp_path, small_poems, "--max-iters", "2", "--eval-interval", "2"))
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    err = run_error(cli(tmp_path, small_poems, "--resume"), capsys)
    assert "is not a readable checkpoint" in err


@pytest.mark.parametrize("flag, value, saved", [("--tokenizer", "cl100k_base", "'char'"), ("--block-size", "64", "32"),
                                                ("--n-layer", "3", "2"), ("--batch-size", "8", "4"), ("--seed", "1", "1337")])
@pytest.mark.slow
def test_resume_refuses_what_would_change_the_runs_batches_or_model(tmp_path, small_poems, capsys, flag, value, saved):
    pretrain.main(cli(tmp_path, small_poems, "--max-iters", "2", "--eval-interval", "2"))
    err = run_error(cli(tmp_path, small_poems, "--resume", "--max-iters", "4", flag, value), capsys)
    assert f"{flag} {value}: the run at {tmp_path / 'ckpt.pt'} was started with {saved}, and a resumed run keeps it" in err


@pytest.mark.parametrize("flag, value", [("--n-layer", "0"), ("--batch-size", "0"), ("--block-size", "-8"),
                                         ("--max-iters", "0"), ("--n-embd", "0"), ("--eval-iters", "0")])
def test_non_positive_sizes(tmp_path, small_poems, capsys, flag, value):
    err = run_error(cli(tmp_path, small_poems, flag, value), capsys)
    assert f"{flag} must be positive" in err


def test_bad_poems_folder(tmp_path, capsys):
    err = run_error(["--poems", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.pt")], capsys)
    assert "does not exist" in err


# -----------------------------------------------------------------------------
# Optimizer and schedule


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10)
    lrs = [lr_at(s, config, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert all(a < b for a, b in zip(lrs[:11], lrs[1:11]))  # still climbing at the last warmup step
    assert lrs[10] == 1e-3 and max(lrs) == 1e-3  # the peak is reached once, where the cosine starts
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4) and lrs[55] == pytest.approx(5.5e-4, rel=0.02)


@pytest.mark.slow
def test_a_run_shorter_than_its_warmup_is_warned_about(tmp_path, small_poems, capsys):
    pretrain.main(cli(tmp_path, small_poems, "--max-iters", "3", "--eval-interval", "3", "--warmup-iters", "10"))
    assert "shorter than --warmup-iters 10: the learning rate never reaches --lr" in capsys.readouterr().out
    pretrain.main(cli(tmp_path / "b", small_poems, "--max-iters", "3", "--eval-interval", "3", "--warmup-iters", "3"))
    assert "shorter than --warmup-iters" not in capsys.readouterr().out


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = configure_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")

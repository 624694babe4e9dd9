"""lora.py: the adapted model starts as the base, merges exactly, trains only its adapters;
and the runs: --lora-rank saves the adapters alone, they load back on their base (and on
no other), merge into an ordinary checkpoint, and a LoRA run resumes exactly."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
from model import GPT, GPTConfig
import sample
from tanggpt.checkpoint import load_checkpoint, load_model, model_and_tokenizer
from tanggpt.lora import (LoRALinear, adapter_layers, adapter_state_dict, adapters_disabled, add_adapters,
                  load_adapter_state_dict, merge_adapters, trainable_parameters)
from tools import compare_lora
from tools import merge_lora


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(seed))


def with_trained_adapters(targets: str = "all", rank: int = 4, token_ids: tuple = ()) -> tuple[GPT, GPT]:
    """(base, adapted copy whose B matrices and token rows' change are random, as after some training)."""
    base = tiny_model()
    adapted = copy.deepcopy(base)
    add_adapters(adapted, rank=rank, alpha=8, targets=targets, token_ids=token_ids)
    with torch.no_grad():
        for layer in adapter_layers(adapted).values():
            layer.lora_B.normal_(0, 0.05)
        if token_ids:
            adapted.wte.row_delta.normal_(0, 0.5)
    return base, adapted


@pytest.mark.parametrize("targets, count, token_ids", [("attention", 4, ()), ("mlp", 4, ()), ("all", 8, ()),
                                                      ("all", 8, (0, 3))])
def test_zero_initialised_b_gives_the_base_models_outputs(targets, count, token_ids):
    base = tiny_model()
    adapted = copy.deepcopy(base)
    wrapped = add_adapters(adapted, rank=4, alpha=8, targets=targets, token_ids=token_ids)
    assert len(wrapped) == count and all(isinstance(adapted.get_submodule(p), LoRALinear) for p in wrapped)
    assert torch.equal(adapted(tokens())[0], base(tokens())[0])


@pytest.mark.parametrize("token_ids", [(), (0, 3)])
def test_merged_and_unmerged_forwards_agree_and_disabled_is_the_base(token_ids):
    base, adapted = with_trained_adapters(token_ids=token_ids)
    unmerged = adapted(tokens())[0]
    assert (unmerged - base(tokens())[0]).abs().max() > 1e-3  # the adapters do change the function
    with adapters_disabled(adapted):
        assert torch.equal(adapted(tokens())[0], base(tokens())[0])
    assert torch.equal(adapted(tokens())[0], unmerged)  # switched back on after the block
    merged = merge_adapters(copy.deepcopy(adapted))
    assert not adapter_layers(merged)
    assert set(merged.state_dict()) == set(base.state_dict())  # an ordinary model again
    assert merged.lm_head.weight is merged.wte.weight  # embedding and head tied, as GPT builds them
    torch.testing.assert_close(merged(tokens())[0], unmerged, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_scaled_b_times_a():
    _, adapted = with_trained_adapters(rank=4)
    layer = adapted.blocks[0].attn.c_attn
    assert torch.allclose(layer.delta_weight(), layer.lora_B @ layer.lora_A * (8 / 4))
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 4


@pytest.mark.parametrize("token_ids", [(), (0, 3)])
def test_after_a_step_only_adapter_parameters_changed(token_ids):
    base = tiny_model()
    model = copy.deepcopy(base).train()
    add_adapters(model, rank=2, alpha=4, targets="all", token_ids=token_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for _ in range(2):  # the first step moves only B (A's gradient is B-weighted, and B is zero)
        _, loss = model(tokens(), tokens(2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == set(adapter_state_dict(model))  # every A and B (and the token rows' change), nothing else
    assert_frozen_weights_are_the_bases(model, base)
    # In use, the embedding (and the head tied to it) changed in the listed rows alone.
    moved = (model.wte.weight - base.wte.weight).abs().amax(dim=1).nonzero().flatten().tolist()
    assert moved == list(token_ids)
    torch.testing.assert_close(model.lm_head(model.wte.weight), model.wte.weight @ model.wte.weight.T)


def assert_frozen_weights_are_the_bases(model: GPT, base: GPT) -> None:
    """The wrapped weights sit under .base, untouched; the rest where they were."""
    state = model.state_dict()
    for name, tensor in base.state_dict().items():
        if name == "lm_head.weight" and "lm_head.weight" not in state:
            continue  # tied to wte: the head reads the embedding's rows (lora.TiedHead)
        key = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state.get(key, state.get(name)), tensor), name


def test_trainable_share_and_adapter_state_are_small():
    _, adapted = with_trained_adapters(rank=4, token_ids=(0, 1, 2))
    trainable, total = trainable_parameters(adapted)
    # per block: c_attn 4·(32+96), attn c_proj 4·(32+32), c_fc 4·(32+128), mlp c_proj 4·(128+32); 3 rows of 32
    assert trainable == 2 * 4 * (128 + 64 + 160 + 160) + 3 * 32
    assert total == trainable + tiny_model().num_params()
    state = adapter_state_dict(adapted)
    assert sum(t.numel() for t in state.values()) == trainable
    fresh = copy.deepcopy(tiny_model())
    add_adapters(fresh, rank=4, alpha=8, token_ids=(0, 1, 2))
    load_adapter_state_dict(fresh, state)
    assert torch.equal(fresh(tokens())[0], adapted(tokens())[0])


def test_adapter_weights_for_other_adapters_are_refused():
    _, adapted = with_trained_adapters(targets="attention")
    other = tiny_model()
    add_adapters(other, rank=4, alpha=8, targets="mlp")
    with pytest.raises(ValueError, match="do not match the model's adapters"):
        load_adapter_state_dict(other, adapter_state_dict(adapted))


def test_bad_arguments():
    with pytest.raises(ValueError, match="targets must be one of attention, mlp, all"):
        add_adapters(tiny_model(), rank=4, alpha=8, targets="head")
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRALinear(torch.nn.Linear(4, 4), rank=0, alpha=1)


# -----------------------------------------------------------------------------
# Runs: finetune.py --lora-rank, adapter checkpoints, tools/merge_lora.py, sample.py and evaluate.py

TUNE = ["--no-compile", "--dtype", "float32", "--device", "cpu", "--batch-size", "4", "--warmup-iters", "4",
        "--eval-interval", "3", "--sample-tokens", "8", "--sample-titles", "春夜"]


def tune(init: Path, poems: Path, out: Path, *extra: str) -> dict:
    return finetune.main(["--init", str(init), "--poems", str(poems), "--out", str(out), *TUNE, *extra])


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_poems, tiny_pretrained) -> Path:
    """A folder holding base.pt (a copy of tiny_pretrained), lora.pt (rank-8 adapters tuned on
    it for 6 steps) and full.pt (the same 6 steps tuning every weight)."""
    folder = tmp_path_factory.mktemp("lora_runs")
    shutil.copy(tiny_pretrained, folder / "base.pt")
    before = file_hash(folder / "base.pt")
    tune(folder / "base.pt", small_poems, folder / "lora.pt", "--max-iters", "6", "--lora-rank", "8")
    tune(folder / "base.pt", small_poems, folder / "full.pt", "--max-iters", "6")
    assert file_hash(folder / "base.pt") == before  # the base is read, never written
    return folder


def one_line_error(main, argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.slow
def test_an_adapter_checkpoint_holds_the_adapters_alone_and_loads_back_exactly(runs):
    ckpt = load_checkpoint(runs / "lora.pt")
    assert ckpt["kind"] == "sft" and ckpt["lora"]["rank"] == 8 and ckpt["lora"]["targets"] == "all"
    assert ckpt["lora"]["base"] == str((runs / "base.pt").resolve())
    assert ckpt["model"] and all(name.endswith((".lora_A", ".lora_B")) for name in ckpt["model"]
                                 if name != "wte.row_delta")
    assert (runs / "lora.pt").stat().st_size <= 0.10 * (runs / "full.pt").stat().st_size

    model, tokenizer = model_and_tokenizer(ckpt, runs / "lora.pt", merge=False)
    # By default the special tokens' rows train too (--lora-tokens specials).
    assert ckpt["lora"]["token_ids"] == sorted(tokenizer.special_ids.values())
    assert ckpt["model"]["wte.row_delta"].shape == (len(tokenizer.special_ids), model.config.n_embd)
    for name, tensor in adapter_state_dict(model).items():
        assert torch.equal(tensor, ckpt["model"][name]), name
    base, _, _ = load_model(runs / "base.pt")
    assert_frozen_weights_are_the_bases(model, base)  # the frozen rest is the base's, exactly
    assert any(layer.lora_B.abs().max() > 0 for layer in adapter_layers(model).values())  # training moved B
    assert model.wte.row_delta.abs().max() > 0  # and the token rows

    merged, _, kind = load_model(runs / "lora.pt")  # what sample.py and evaluate.py load: adapters folded in
    assert kind == "sft" and not adapter_layers(merged)
    x = tokens() % 40
    torch.testing.assert_close(merged.eval()(x)[0], model.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_merge_writes_an_ordinary_checkpoint_of_the_same_model(runs, tmp_path, capsys):
    out = tmp_path / "merged.pt"
    merge_lora.main(["--ckpt", str(runs / "lora.pt"), "--out", str(out)])
    ckpt = load_checkpoint(out)
    assert "lora" not in ckpt and ckpt["merged_from"]["rank"] == 8 and ckpt["kind"] == "sft"
    merged, _, _ = load_model(out)
    adapted, _, _ = load_model(runs / "lora.pt")
    x = tokens() % 40
    assert torch.equal(merged.eval()(x)[0], adapted.eval()(x)[0])
    argv = ["--ckpt", str(runs / "lora.pt"), "--title", "春夜", "--max-new-tokens", "12", "--device", "cpu"]
    capsys.readouterr()
    sample.main(argv)
    from_adapters = capsys.readouterr().out
    sample.main([*argv[:1], str(out), *argv[2:]])
    assert capsys.readouterr().out == from_adapters

    assert "exists; give another --out, or --overwrite" in one_line_error(
        merge_lora.main, ["--ckpt", str(runs / "lora.pt"), "--out", str(out)], capsys)
    assert "holds no LoRA adapters" in one_line_error(
        merge_lora.main, ["--ckpt", str(runs / "full.pt"), "--out", str(tmp_path / "x.pt")], capsys)


def test_a_moved_base_is_found_beside_its_adapters_or_given_and_another_is_refused(runs, tmp_path, capsys):
    ckpt = load_checkpoint(runs / "lora.pt")
    ckpt["lora"]["base"] = str(tmp_path / "gone" / "base.pt")  # as if the two had been moved away together
    adapters = tmp_path / "moved" / "lora.pt"
    adapters.parent.mkdir()
    torch.save(ckpt, adapters)
    argv = ["--ckpt", str(adapters), "--title", "春夜", "--max-new-tokens", "4", "--device", "cpu"]
    err = one_line_error(sample.main, argv, capsys)
    assert f"holds LoRA adapters, and its base checkpoint {tmp_path / 'gone' / 'base.pt'} is not there" in err
    assert "--base PATH" in err

    sample.main([*argv, "--base", str(runs / "base.pt")])  # given where it is now
    shutil.copy(runs / "base.pt", adapters.parent / "base.pt")  # or moved beside the adapters
    sample.main(argv)
    assert capsys.readouterr().out.strip()

    err = one_line_error(sample.main, [*argv, "--base", str(runs / "full.pt")], capsys)
    assert "its adapters were trained on other weights than" in err and "--base PATH" in err
    err = one_line_error(evaluate.main, ["--ckpt", str(adapters), "--base", str(runs / "full.pt")], capsys)
    assert "its adapters were trained on other weights than" in err


def test_evaluate_reads_an_adapter_checkpoint_beside_a_full_one(runs, small_poems, capsys):
    columns = evaluate.main(["--ckpt", str(runs / "lora.pt"), "--compare", str(runs / "full.pt"), "--poems",
                             str(small_poems), "--num-titles", "2", "--task-prompts", "0", "--max-new-tokens", "8",
                             "--device", "cpu", "--json"])
    lora, full = columns[str(runs / "lora.pt")], columns[str(runs / "full.pt")]
    assert lora["kind"] == "sft + LoRA r8" and full["kind"] == "sft"
    assert lora["parameters"] == full["parameters"]  # merged: the base's shape


@pytest.mark.slow
def test_lora_rank_resumes_exactly_and_keeps_its_adapters(runs, small_poems, capsys):
    split = runs / "split.pt"
    tune(runs / "base.pt", small_poems, split, "--max-iters", "3", "--lora-rank", "8")
    capsys.readouterr()
    finetune.main(["--resume", "--out", str(split), "--max-iters", "6", "--device", "cpu"])
    assert "LoRA rank 8 on all linear layers" in capsys.readouterr().out
    straight, resumed = load_checkpoint(runs / "lora.pt")["model"], load_checkpoint(split)["model"]
    assert set(straight) == set(resumed)
    for name in straight:  # float rounding apart (kernels may add in another order), the same run
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    err = one_line_error(finetune.main, ["--resume", "--out", str(split), "--max-iters", "8", "--lora-rank", "4"],
                         capsys)
    assert "--lora-rank 4: the run at" in err and "started with 8" in err


@pytest.mark.slow
def test_lora_tokens_none_trains_the_linear_layers_alone(runs, small_poems, tmp_path):
    out = tmp_path / "no_rows.pt"
    tune(runs / "base.pt", small_poems, out, "--max-iters", "2", "--lora-rank", "4", "--lora-tokens", "none")
    ckpt = load_checkpoint(out)
    assert ckpt["lora"]["token_ids"] == [] and all(name.endswith((".lora_A", ".lora_B")) for name in ckpt["model"])
    adapted, _, _ = load_model(out)
    del ckpt["lora"]["token_ids"]  # an adapter checkpoint from before the flag existed loads the same
    torch.save(ckpt, tmp_path / "older.pt")
    older, _, _ = load_model(tmp_path / "older.pt")
    x = tokens() % 40
    assert torch.equal(older.eval()(x)[0], adapted.eval()(x)[0])


@pytest.mark.slow
def test_lora_settings_without_a_rank_are_noted(runs, small_poems, tmp_path, capsys):
    capsys.readouterr()
    tune(runs / "base.pt", small_poems, tmp_path / "full.pt", "--max-iters", "1", "--lora-alpha", "32",
         "--lora-tokens", "none")
    out = capsys.readouterr().out
    assert "note: --lora-alpha, --lora-tokens only apply with --lora-rank R; this run tunes every weight" in out
    assert "lora" not in load_checkpoint(tmp_path / "full.pt")


@pytest.mark.parametrize("flags, message", [
    (["--lora-rank", "-1"], "--lora-rank must not be negative"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-rank", "4", "--lora-dropout", "1"], "--lora-dropout in [0, 1)"),
    (["--lora-rank", "4", "--lora-targets", "head"], "invalid choice: 'head'"),
])
def test_bad_lora_flags_are_one_line(tmp_path, tiny_pretrained, capsys, flags, message):
    argv = ["--init", str(tiny_pretrained), "--out", str(tmp_path / "x.pt"), *flags]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_an_untied_head_refuses_to_train_token_rows_in_one_line(tmp_path, capsys):
    # TiedHead reads the embedding's rows; an untied head has rows of its own.
    from tanggpt.checkpoint import PRETRAIN, model_checkpoint, save_checkpoint
    from data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_texts(["春眠不覺曉，處處聞啼鳥。"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16,
                          tie_head=False))
    save_checkpoint(tmp_path / "untied.pt", model_checkpoint(PRETRAIN, model, tokenizer, step=1))
    argv = ["--init", str(tmp_path / "untied.pt"), "--out", str(tmp_path / "x.pt"), "--lora-rank", "4"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "--lora-tokens none" in err, err
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_compare_lora_measures_each_variant_once_and_tabulates(tmp_path, small_poems, tiny_pretrained, capsys):
    argv = ["--init", str(tiny_pretrained), "--ranks", "0,4", "--max-iters", "2", "--num-titles", "2", "--poems",
            str(small_poems), "--out-dir", str(tmp_path / "runs"), "--finetune-flags",
            "--no-compile --dtype float32 --device cpu --batch-size 4 --sample-tokens 8 --warmup-iters 1"]
    table = compare_lora.main(argv)
    full, lora = (json.loads((tmp_path / "runs" / f"r{r}.json").read_text(encoding="utf-8")) for r in (0, 4))
    assert full["trainable"] == full["total"] and 0 < lora["trainable"] < 0.1 * full["trainable"]
    assert lora["checkpoint_bytes"] < full["checkpoint_bytes"] and lora["steps"] == full["steps"] == 2
    assert full["peak_rss_bytes"] > 2**20 and full["seconds_per_step"] > 0 and 0 <= lora["stop_rate"] <= 1
    assert "| full | " in table and "| LoRA r = 4 | " in table and (tmp_path / "runs" / "table.md").exists()

    stamp = (tmp_path / "runs" / "r4.pt").stat().st_mtime_ns
    assert compare_lora.main(argv) == table  # measured once: reprinted from the saved figures
    assert (tmp_path / "runs" / "r4.pt").stat().st_mtime_ns == stamp
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        compare_lora.main([*argv[:5], "3", *argv[6:]])
    assert exit_info.value.code == 2 and "r0.pt was trained with other settings" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_under_torchrun_trains_the_adapters_and_rank_0_writes(tmp_path, small_poems, tiny_pretrained):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp.pt"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(finetune.__file__)), "--init", str(tiny_pretrained), "--poems", str(small_poems), "--out", str(out),
         *TUNE, "--max-iters", "4", "--lora-rank", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("LoRA rank 4 on all linear layers") == 1  # rank 0 alone prints
    assert "8 samples per step" in result.stdout  # 4 per process, 2 processes
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 4 and all(name.endswith((".lora_A", ".lora_B", ".row_delta")) for name in ckpt["model"])
    assert any(t.abs().max() > 0 for name, t in ckpt["model"].items() if name.endswith(".lora_B"))


@pytest.mark.parametrize("script, flags", [
    ("finetune.py", ("--lora-rank", "--lora-alpha", "--lora-targets", "--lora-dropout", "--lora-tokens")),
    ("align.py", ("--lora-rank", "--lora-alpha", "--lora-targets", "--lora-dropout", "--lora-tokens")),
    ("-m tools.merge_lora", ("--ckpt", "--out", "--base", "--overwrite")),
    ("-m tools.compare_lora", ("--init", "--ranks", "--out-dir", "--max-iters", "--num-titles", "--poems", "--finetune-flags")),
])
@pytest.mark.slow
def test_help_documents_the_lora_flags(script, flags):
    from tests.conftest import REPO_ROOT

    result = subprocess.run([sys.executable, *script.split(), "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())  # argparse wraps lines
    for flag in flags:
        assert flag in help_text, flag
    if script in ("finetune.py", "align.py"):
        assert "(default: 0)" in help_text and "(default: 16.0)" in help_text and "(default: all)" in help_text

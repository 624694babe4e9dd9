"""Nothing lost, round two: what a run reads and what it writes (docs/reliability.md).

- --overwrite replaces the previous run only once the new one has saved a checkpoint;
- no output of a run is one of its inputs;
- a resumed run or a reused cache is the same work (its inputs are fingerprinted);
- what is read back (checkpoints from elsewhere, pair caches) is validated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import align
import finetune
import pretrain
from tanggpt.run_files import RunFiles
from tests.test_align import align_args, run_error, scripted_answers  # noqa: F401 (a fixture)
from tests.test_reliability import one_line_error, pretrain_argv, tune_argv


def fake_run(out: Path) -> dict[str, bytes]:
    """The four files of a finished run at `out`, each holding bytes a test can recognise."""
    files = RunFiles(out)
    contents = {}
    for path in files.paths():
        path.write_bytes(f"old {path.name}".encode())
        contents[path.name] = path.read_bytes()
    return contents


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -----------------------------------------------------------------------------
# --overwrite deletes nothing until every input is checked (and the new run has saved)


def bad_data(tmp: Path) -> list[str]:
    (tmp / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    return ["--data", str(tmp / "bad.jsonl")]


def missing_corpus(tmp: Path) -> list[str]:
    return ["--poems", str(tmp / "no-such-folder")]


@pytest.mark.parametrize("bad_input", [bad_data, missing_corpus], ids=["bad --data", "missing --poems"])
def test_finetune_overwrite_with_a_bad_input_keeps_the_old_run(tmp_path, small_poems, tiny_pretrained, capsys,
                                                               bad_input):
    out = tmp_path / "run" / "ckpt_sft.pt"
    out.parent.mkdir()
    before = fake_run(out)
    one_line_error(finetune.main, tune_argv(out, small_poems, tiny_pretrained, "--overwrite", *bad_input(tmp_path)),
                   capsys)
    assert folder_contents(out.parent) == before


def test_align_overwrite_with_a_pretrained_init_keeps_the_old_run(tmp_path, small_poems, tiny_pretrained, capsys):
    out = tmp_path / "ckpt_dpo.pt"
    before = fake_run(out)
    err = one_line_error(align.main, tune_argv(out, small_poems, tiny_pretrained, "--overwrite"), capsys)
    assert "is a pretrained checkpoint" in err
    assert folder_contents(tmp_path) == before


def test_pretrain_overwrite_with_a_missing_corpus_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "ckpt.pt"
    before = fake_run(out)
    one_line_error(pretrain.main, pretrain_argv(out, tmp_path / "no-such-folder", "--overwrite"), capsys)
    assert folder_contents(tmp_path) == before


def test_an_overwrite_run_that_stops_before_its_first_checkpoint_puts_the_old_run_back(
        tmp_path, small_poems, tiny_pretrained, capsys, monkeypatch):
    out = tmp_path / "ckpt_sft.pt"
    before = fake_run(out)

    def interrupted(*args, **kwargs):  # Ctrl-C while the gallery is sampled, before any step
        assert not out.exists() and RunFiles(out).previous.is_dir()  # moved aside, not deleted
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.FinetuneStage, "sample", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(tune_argv(out, small_poems, tiny_pretrained, "--overwrite", "--max-iters", "2"))
    assert exit_info.value.code == 130
    printed = capsys.readouterr()
    assert "put the previous run at" in printed.out + printed.err
    assert folder_contents(tmp_path) == before
    assert not RunFiles(out).previous.exists()


def test_an_overwrite_run_replaces_the_old_one_once_it_has_saved(tmp_path, small_poems, capsys):
    out = tmp_path / "ckpt.pt"
    fake_run(out)
    pretrain.main(pretrain_argv(out, small_poems, "--max-iters", "2", "--eval-interval", "2", "--overwrite"))
    assert "will be replaced when this run saves its first checkpoint" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["step"] == 2
    assert all(not data.startswith(b"old ") for data in folder_contents(tmp_path).values())
    assert not RunFiles(out).previous.exists()


@pytest.mark.parametrize("new_run_saved", [True, False])
def test_a_killed_overwrite_run_is_settled_by_the_next_run(tmp_path, new_run_saved):
    """SIGKILL between moving the old run aside and deleting it leaves the `previous` folder:
    the next run at --out keeps the new checkpoint if there is one, else the old run."""
    out = tmp_path / "ckpt.pt"
    files = RunFiles(out)
    before = fake_run(out)
    files.start(None, overwrite=True)
    files.log.write_text("new log\n", encoding="utf-8")
    if new_run_saved:
        out.write_bytes(b"new checkpoint")
    notes = RunFiles(out).prepare(resume=True, overwrite=False)
    assert not files.previous.exists()
    if new_run_saved:
        assert "removed" in notes[0] and folder_contents(tmp_path) == {"ckpt.pt": b"new checkpoint",
                                                                       "ckpt.log.jsonl": b"new log\n"}
    else:
        assert "put back" in notes[0] and folder_contents(tmp_path) == before


# -----------------------------------------------------------------------------
# No output of a run is one of its inputs


def test_align_pairs_equal_to_init_is_refused_even_with_overwrite(tmp_path, small_poems, tiny_tuned, capsys):
    init = tmp_path / "ckpt_sft.pt"
    init.write_bytes(tiny_tuned.read_bytes())
    for extra in ([], ["--overwrite"]):
        err = one_line_error(align.main, tune_argv(tmp_path / "ckpt_dpo.pt", small_poems, init, "--pairs", str(init),
                                                   *extra), capsys)
        assert f"--pairs {init} is also --init: the run would write over one of its own inputs" in err
    assert init.read_bytes() == tiny_tuned.read_bytes()


@pytest.mark.parametrize("clash", ["log", "samples", "plot"])
def test_align_pairs_equal_to_one_of_the_runs_files_is_refused(tmp_path, small_poems, tiny_tuned, capsys, clash):
    out = tmp_path / "ckpt_dpo.pt"
    path = getattr(RunFiles(out), clash)
    err = one_line_error(align.main, tune_argv(out, small_poems, tiny_tuned, "--pairs", str(path)), capsys)
    assert f"is also --out's {clash}: the run would write over another file it writes; give another --pairs" in err


def test_finetune_out_or_its_log_equal_to_data_is_refused(tmp_path, small_poems, tiny_pretrained, capsys):
    data = tmp_path / "mine.log.jsonl"
    text = json.dumps({"instruction": "寫詩", "input": "春", "output": "春風"}, ensure_ascii=False) + "\n"
    data.write_text(text, encoding="utf-8")
    for out, name in ((data, "--out"), (tmp_path / "mine.pt", "--out's log")):  # mine.pt logs to mine.log.jsonl
        err = one_line_error(finetune.main, tune_argv(out, small_poems, tiny_pretrained, "--data", str(data),
                                                      "--overwrite"), capsys)
        assert f"{name} {data} is also --data: the run would write over one of its own inputs" in err
    assert data.read_text(encoding="utf-8") == text


def test_a_json_output_in_the_corpus_folder_is_refused(tmp_path, small_poems, tiny_tuned, capsys):
    """The next run would read the checkpoint or the pair cache as a file of poems."""
    err = one_line_error(pretrain.main, pretrain_argv(small_poems / "ckpt.json", small_poems), capsys)
    assert "is in the --poems folder" in err and "every .json file there is read as poems" in err
    err = one_line_error(align.main, tune_argv(tmp_path / "ckpt_dpo.pt", small_poems, tiny_tuned, "--pairs",
                                               str(small_poems / "pairs.json")), capsys)
    assert "--pairs" in err and "is in the --poems folder" in err
    assert sorted(p.name for p in small_poems.iterdir()) == ["poet.tang.0.json", "poet.tang.1000.json"]


def test_a_hard_link_to_init_is_the_same_file(tmp_path, small_poems, tiny_pretrained, capsys):
    init = tmp_path / "ckpt.pt"
    init.write_bytes(tiny_pretrained.read_bytes())
    (tmp_path / "other.pt").hardlink_to(init)
    err = one_line_error(finetune.main, tune_argv(tmp_path / "other.pt", small_poems, init, "--overwrite"), capsys)
    assert "is also --init" in err


# -----------------------------------------------------------------------------
# A resumed run or a reused cache is the same work


def test_resuming_finetune_after_its_data_file_changed_is_refused(tmp_path, small_poems, tiny_pretrained, capsys):
    data = tmp_path / "mine.jsonl"
    record = {"instruction": "請用以下題目寫一首詩", "input": "春", "output": "春風吹柳綠"}
    data.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "sft.pt"
    finetune.main(tune_argv(out, small_poems, tiny_pretrained, "--data", str(data), "--max-iters", "2",
                            "--eval-interval", "2"))
    data.write_text(json.dumps({**record, "output": "秋風吹葉黃"}, ensure_ascii=False) + "\n", encoding="utf-8")
    err = one_line_error(finetune.main, ["--out", str(out), "--resume", "--max-iters", "4"], capsys)
    assert "--resume: the content of --data changed since the run at" in err and "restore it" in err
    assert torch.load(out, weights_only=True)["step"] == 2


def test_resuming_pretraining_on_a_changed_corpus_is_refused(tmp_path, small_poems, capsys):
    poems = tmp_path / "poems"
    poems.mkdir()
    for path in small_poems.iterdir():
        (poems / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "ckpt.pt"
    pretrain.main(pretrain_argv(out, poems, "--max-iters", "2", "--eval-interval", "2"))
    first = poems / "poet.tang.0.json"
    records = json.loads(first.read_text(encoding="utf-8"))
    records[0]["title"] += "又"  # one character of one title
    first.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    err = one_line_error(pretrain.main, ["--out", str(out), "--resume", "--poems", str(poems), "--max-iters", "4"],
                         capsys)
    assert "--resume: the content of --poems changed since the run at" in err


def test_the_pair_cache_key_holds_the_prompts_and_the_tokenizer(tmp_path, char_tokenizer, splits):
    from data.tokenizer import CharTokenizer
    from tanggpt.device import setup_runtime
    from tanggpt.preference import Pair, PairCounts, load_pairs, save_pairs

    config = align.AlignConfig(out=str(tmp_path / "dpo.pt"))
    runtime = setup_runtime("cpu", "float32")
    prompts = splits["alignment"][:4]
    key = align.pair_key(config, "f" * 16, char_tokenizer, prompts, runtime)
    pairs = [Pair("春", "春風", "秋雨", -1.0, -2.0), Pair("夏", "夏日", "冬雪", -1.5, -2.5)]
    save_pairs(tmp_path / "p.json", key, pairs, PairCounts(2, 8, 2, 2, 2))
    assert load_pairs(tmp_path / "p.json", key)[0] == pairs
    other_corpus = align.pair_key(config, "f" * 16, char_tokenizer, splits["alignment"][1:5], runtime)
    assert "was built with prompts_fingerprint" in load_pairs(tmp_path / "p.json", other_corpus)[1]
    other_tokenizer = align.pair_key(config, "f" * 16, CharTokenizer("春夏秋冬"), prompts, runtime)
    assert "tokenizer_fingerprint" in load_pairs(tmp_path / "p.json", other_tokenizer)[1]


# -----------------------------------------------------------------------------
# What is read back is validated


def valid_cache() -> dict:
    pair = {"title": "春", "chosen": "春風", "rejected": "秋雨", "reference_chosen": -1.0, "reference_rejected": -2.0}
    return {"key": {}, "counts": {}, "pairs": [pair, {**pair, "title": "夏"}]}


def edited(change) -> str:
    data = valid_cache()
    change(data)
    return json.dumps(data, ensure_ascii=False)


@pytest.mark.parametrize("text, problem", [
    (json.dumps(valid_cache())[:-40], "not JSON, or cut short"),
    ("[]", "expected an object with a 'key' object and a 'pairs' list"),
    (edited(lambda d: d.update(key=[])), "expected an object with a 'key' object"),
    (edited(lambda d: d["pairs"].pop()), "1 pairs; training needs at least 2"),
    (edited(lambda d: d["pairs"][1].pop("rejected")), "pair 1: expected the fields"),
    (edited(lambda d: d["pairs"][0].update(chosen=7)), "pair 0: chosen is not a non-empty string"),
    (edited(lambda d: d["pairs"][1].update(reference_chosen="-1")), "pair 1: reference_chosen is not a finite"),
    (edited(lambda d: d["pairs"][1].update(reference_rejected=float("nan"))), "reference_rejected is not a finite"),
], ids=["truncated", "a list", "key not an object", "one pair", "missing field", "text not a string",
        "number as text", "NaN"])
def test_an_edited_or_truncated_pair_cache_is_named_not_used(tmp_path, text, problem):
    from tanggpt.preference import load_pairs

    (tmp_path / "p.json").write_text(text, encoding="utf-8")
    pairs, why_not = load_pairs(tmp_path / "p.json", {})
    assert pairs is None and why_not.startswith("is not a pair cache") and problem in why_not, why_not


def test_a_named_pair_cache_that_was_edited_is_refused_before_training(tmp_path, small_poems, tiny_tuned, capsys,
                                                                       scripted_answers):
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1"))
    cache = tmp_path / "dpo.pairs.json"
    data = json.loads(cache.read_text(encoding="utf-8"))
    data["pairs"][0]["reference_chosen"] = "oops"
    cache.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1", "--pairs", str(cache),
                               out="other.pt"), capsys)
    assert f"--pairs {cache} is not a pair cache (pair 0: reference_chosen is not a finite number)" in err
    assert not any(p.name.startswith("other") for p in tmp_path.iterdir())  # no samples file left to block a rerun
    # The run's own cache (no --pairs) is rebuilt, with a note.
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1", "--overwrite"))
    assert "pair 0: reference_chosen is not a finite number); rebuilding it" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Checks that come before the long work


def tiktoken_tuned(tmp_path: Path) -> Path:
    """An instruction-tuned checkpoint (untrained weights) whose tokenizer is a tiktoken one."""
    from data.tokenizer import TiktokenTokenizer
    from model import GPT, GPTConfig
    from tanggpt.checkpoint import SFT, model_checkpoint, save_checkpoint

    tokenizer = TiktokenTokenizer.from_texts("cl100k_base", ["春夜喜雨，好雨知時節"])
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    path = tmp_path / "tiktoken_sft.pt"
    save_checkpoint(path, model_checkpoint(SFT, model, tokenizer))
    return path


@pytest.mark.parametrize("args, message", [
    ([], "--rhyme-weight: --rhyme needs the char tokenizer"),
    (["--preference", "rhyme", "--rhyme-weight", "0"], "--preference rhyme: --rhyme needs the char tokenizer"),
])
def test_rhyme_on_a_tiktoken_model_is_refused_before_sampling(tmp_path, small_poems, capsys, monkeypatch, args,
                                                              message):
    monkeypatch.setattr(align, "load_corpus", lambda *a, **k: pytest.fail("the corpus was loaded before the check"))
    err = run_error(align_args(tmp_path, small_poems, tiktoken_tuned(tmp_path), *args), capsys)
    assert message in err


@pytest.mark.parametrize("make_pairs, message", [(lambda tmp: tmp, "is a folder"),
                                                 (lambda tmp: tmp / "dpo.pt" / "pairs.json", "is a file")])
def test_an_unusable_pairs_path_is_refused_before_sampling(tmp_path, small_poems, tiny_tuned, capsys, monkeypatch,
                                                           make_pairs, message):
    (tmp_path / "dpo.pt").write_bytes(b"")  # a file where a folder would have to be made
    monkeypatch.setattr(align, "load_corpus", lambda *a, **k: pytest.fail("the corpus was loaded before the check"))
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned, "--pairs", str(make_pairs(tmp_path)),
                               out="run/dpo.pt"), capsys)
    assert err.startswith("error: --pairs") and message in err


def test_a_finished_align_run_without_its_cache_says_nothing_to_do_at_once(tmp_path, small_poems, tiny_tuned, capsys,
                                                                           scripted_answers, monkeypatch):
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1"))
    (tmp_path / "dpo.pairs.json").unlink()
    monkeypatch.setattr(align, "build_pairs", lambda *a, **k: pytest.fail("pairs sampled again"))
    capsys.readouterr()
    assert align.main(["--out", str(tmp_path / "dpo.pt"), "--resume"]) == {}
    assert "nothing to do: the run at" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Messages that say the real reason


def test_pairs_dropped_for_the_block_are_counted_as_such(tmp_path, small_poems, tiny_tuned, capsys, scripted_answers,
                                                         monkeypatch):
    monkeypatch.setattr(align, "fits", lambda tokenizer, pair, block_size: False)
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned), capsys)
    assert "too few preference pairs (tonal)" in err and "dropped for not fitting block_size" in err
    assert "--samples-per-prompt" not in err


def test_data_records_dropped_for_the_block_are_named(tmp_path, small_poems, tiny_pretrained, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"instruction": "寫", "input": "長", "output": "長" * 500}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    err = one_line_error(finetune.main, tune_argv(tmp_path / "sft.pt", small_poems, tiny_pretrained, "--data",
                                                  str(data), "--data-mode", "replace"), capsys)
    assert "all 1 --data records are longer" in err and "split is empty" not in err


# -----------------------------------------------------------------------------
# Checkpoints from elsewhere: one line naming the file and what is wrong


def edited_checkpoint(source: Path, target: Path, change) -> Path:
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    torch.save(ckpt, target)
    return target


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model_config"].update(n_kv_head=1), "its model_config has settings this version does not know "
                                                      "(n_kv_head)"),
    (lambda c: c["model_config"].update(n_embd=48), "its weights do not match its model_config (size mismatch"),
    (lambda c: c["model_config"].update(n_head=5), "its model_config describes no model this code builds"),
    (lambda c: c["model"].pop("lm_head.weight"), "its weights do not match its model_config (Missing key"),
    (lambda c: c.update(tokenizer={"kind": "char"}), "its tokenizer is not one this version reads"),
    (lambda c: c.update(tokenizer={"kind": "char", "chars": "春夏秋冬"}), "its tokenizer has 9 ids and its model"),
], ids=["unknown field", "other shape", "shape that cannot be", "missing weight", "tokenizer record", "other vocab"])
def test_a_checkpoint_from_elsewhere_is_one_line(tmp_path, small_poems, tiny_pretrained, capsys, change, message):
    init = edited_checkpoint(tiny_pretrained, tmp_path / "foreign.pt", change)
    err = one_line_error(finetune.main, tune_argv(tmp_path / "sft.pt", small_poems, init), capsys)
    assert f"--init {init}: {message}" in err
    assert not (tmp_path / "sft.pt").exists()


def test_an_adapter_checkpoint_without_its_lora_record_fields_is_one_line(tmp_path, small_poems, tiny_pretrained,
                                                                          capsys):
    lora = tmp_path / "lora.pt"
    finetune.main(tune_argv(lora, small_poems, tiny_pretrained, "--lora-rank", "2", "--max-iters", "1"))
    init = edited_checkpoint(lora, tmp_path / "edited.pt", lambda c: c["lora"].pop("base_fingerprint"))
    err = one_line_error(finetune.main, tune_argv(tmp_path / "sft.pt", small_poems, init), capsys)
    assert f"--init {init}: its LoRA record lacks base_fingerprint" in err


def test_a_pair_longer_than_the_block_in_an_edited_cache_is_not_trained_on(tmp_path, small_poems, tiny_tuned, capsys,
                                                                           scripted_answers):
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1"))
    cache = tmp_path / "dpo.pairs.json"
    data = json.loads(cache.read_text(encoding="utf-8"))
    data["pairs"][1]["chosen"] = "長" * 400
    cache.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1", "--pairs", str(cache),
                               out="other.pt"), capsys)
    assert "is not a pair cache for this model (pair 1 is longer than its block_size 96)" in err


def test_an_overwrite_run_that_diverges_before_saving_puts_the_old_run_back(tmp_path):
    from tanggpt.device import setup_runtime
    from tanggpt.training import TrainConfig, TrainingDiverged, train
    from tests.test_reliability import SyntheticStage, tiny_model

    out = tmp_path / "c.pt"
    before = fake_run(out)
    config = TrainConfig(out=str(out), warmup_iters=0, eval_interval=2, log_interval=1, overwrite=True)
    stage = SyntheticStage(lambda model, batch: model(*batch)[1] * float("nan"))
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(tiny_model(), config, stage, setup_runtime("cpu", "float32"), max_iters=4)
    assert folder_contents(tmp_path) == before


def test_overwrite_with_an_adapter_init_whose_base_is_gone_keeps_the_old_run(tmp_path, small_poems, tiny_pretrained,
                                                                             capsys):
    lora = tmp_path / "lora.pt"
    finetune.main(tune_argv(lora, small_poems, tiny_pretrained, "--lora-rank", "2", "--max-iters", "1"))
    moved = tmp_path / "moved"
    moved.mkdir()
    init = edited_checkpoint(lora, moved / "adapters.pt", lambda c: c["lora"].update(base=str(tmp_path / "gone.pt")))
    out = tmp_path / "run" / "sft.pt"
    out.parent.mkdir()
    before = fake_run(out)
    err = one_line_error(finetune.main, tune_argv(out, small_poems, init, "--overwrite"), capsys)
    assert "holds LoRA adapters, and its base checkpoint" in err
    assert folder_contents(out.parent) == before


def test_the_log_and_samples_never_fail_on_half_a_character(tmp_path):
    files = RunFiles(tmp_path / "ckpt.pt")
    files.append_sample("step 1", "春\ud800夜")
    files.append_log({"step": 1, "tokens": 0, "note": "\udcff"})
    assert "春\\ud800夜" in files.samples.read_text(encoding="utf-8")
    assert files.records()[0]["step"] == 1

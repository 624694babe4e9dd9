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
from tests.conftest import TINY
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

"""One error path for every entry point, tools included (issue 23, "Nothing lost, round two").

Every command and tool parses its flags with cli.parse_config and runs under cli.run_cli:
bad input is one line and exit code 2, a float flag is a finite number, a text flag is
UTF-8, and output never raises (text the terminal cannot encode, a reader that closed the
pipe). The tools (bench, compare_lora, merge_lora, the corpus tool, poems.download) check
their inputs before any long work, and never write over what they read.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import align
import evaluate
import finetune
import pretrain
import sample
from data.corpus import Poem, clean_poems
from data.download import download_corpus
from data.errors import UserError
from data.instruct import InstructionDataError, load_instruction_jsonl
from data.tokenizer import build_tokenizer
from model import GPT, GPTConfig
from poems import download as poems_download
from tanggpt.atomic import atomic_write_text
from tanggpt.checkpoint import load_checkpoint, model_checkpoint, model_fingerprint, save_checkpoint
from tanggpt.cli import flag, parse_config, run_cli
from tanggpt.lora import add_adapters
from tests.conftest import REPO_ROOT, TINY
from tools import bench, compare_lora, merge_lora, profile_step
from tools import corpus as corpus_tool

BENCH = ["--vocab-size", "50", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
         "--batch-size", "2", "--dtype", "float32", "--device", "cpu", "--repeats", "1", "--steps", "1",
         "--new-tokens", "2", "--gen-batch", "1", "--no-compile-decode"]


def one_line_error(main, argv: list[str], capsys) -> str:
    """main(argv) exits 2 with exactly one `error:` line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


# -----------------------------------------------------------------------------
# (5) Numbers that are not numbers: every float flag is finite, for every command


@pytest.mark.parametrize("main, flag_, value", [
    (sample.main, "--temperature", "nan"),
    (align.main, "--pair-temperature", "nan"),
    (pretrain.main, "--lr", "inf"),
    (finetune.main, "--lora-alpha", "1e999"),
    (evaluate.main, "--top-p", "-nan"),
])
def test_a_float_flag_that_is_not_a_finite_number_is_refused_by_every_command(main, flag_, value, capsys):
    err = one_line_error(main, [f"{flag_}={value}"], capsys)
    assert err == f"error: argument {flag_}: {value!r} is not a finite number (see --help)"


def test_nan_temperature_never_reaches_the_sampler(tiny_tuned, capsys):
    """It used to pass `temperature < 0` and crash in torch.multinomial."""
    err = one_line_error(sample.main, ["--ckpt", str(tiny_tuned), "--title", "春夜", "--temperature", "nan",
                                       "--device", "cpu"], capsys)
    assert "--temperature" in err and "finite" in err


def test_a_float_that_is_not_a_number_keeps_argparses_words(capsys):
    with pytest.raises(SystemExit):
        parse_config(pretrain.PretrainConfig, ["--lr", "fast"], "")
    assert "argument --lr: invalid float value: 'fast'" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# (6) Text that cannot be encoded: refused where it is read, and output never raises


def test_a_data_record_holding_half_a_character_is_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "寫詩", "input": "春", "output": "春眠不覺曉"}, ensure_ascii=False)
    path.write_text(good + "\n" + '{"instruction": "寫詩", "input": "\\ud800", "output": "春"}\n', encoding="utf-8")
    with pytest.raises(InstructionDataError) as error:
        load_instruction_jsonl(path)
    assert str(error.value).startswith(f"--data {path}:2: field input holds \\ud800")


def test_a_corpus_poem_holding_half_a_character_is_dropped_with_its_reason():
    poems = [Poem("春曉\ud800", ["春眠不覺曉，處處聞啼鳥。"]), Poem("靜夜思", ["床前明月光，疑是地上霜。"]),
             Poem("秋思", ["洞庭\udcff秋水遠，雲夢晚山青。"])]
    kept, report = clean_poems(poems)
    assert [p.title for p in kept] == ["靜夜思"]
    assert report.dropped["half characters (lone surrogates such as \\ud800)"] == 2
    report.summary().encode("utf-8")  # the summary itself prints


@pytest.mark.parametrize("main, argv, flag_", [
    (finetune.main, ["--sample-titles", "春夜,\udcff\udcfe"], "--sample-titles"),
    (sample.main, ["--title", "春\udce6"], "--title"),
    (merge_lora.main, ["--ckpt", "x\udcff.pt"], "--ckpt"),
    (compare_lora.main, ["--finetune-flags", "--sample-titles \udcff"], "--finetune-flags"),
])
def test_an_argument_that_is_not_utf8_is_refused_naming_the_flag(main, argv, flag_, capsys):
    """Python hands a non-UTF-8 argv byte over as a lone surrogate (\\udcXX); printed or saved it would raise."""
    err = one_line_error(main, argv, capsys)
    assert err.startswith(f"error: argument {flag_}: not UTF-8 text (the byte 0x") and "type it as UTF-8" in err


@dataclass
class EchoConfig:
    text: str = flag("", "what to print")


def echo(config: EchoConfig, explicit: set[str]) -> None:
    print("春" + chr(0xD800) + "曉")  # a lone surrogate, as from a corpus title or a JSON escape
    print("閑", file=sys.stderr)


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_printing_never_raises_an_encoding_error(monkeypatch, encoding):
    out, err = io.BytesIO(), io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, encoding=encoding, errors="strict"))
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(err, encoding=encoding, errors="strict"))
    run_cli(echo, EchoConfig, [], "")
    sys.stdout.flush(), sys.stderr.flush()
    expected = "春\\ud800曉\n" if encoding == "utf-8" else "\\u6625\\ud800\\u66c9\n"
    assert out.getvalue().decode(encoding) == expected
    assert err.getvalue().decode(encoding) == ("閑\n" if encoding == "utf-8" else "\\u9591\n")


def test_a_text_file_never_fails_to_save_on_half_a_character(tmp_path):
    atomic_write_text(tmp_path / "samples.txt", "春\ud800曉")
    assert (tmp_path / "samples.txt").read_text(encoding="utf-8") == "春\\ud800曉"


def test_an_interactive_line_that_is_not_utf8_is_said_and_skipped(tiny_tuned, monkeypatch, capsys):
    """A strict decoder used to raise UnicodeDecodeError (a traceback) and lose the lines after it."""
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe\n" + "春夜\n".encode()), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    sample.main(["--ckpt", str(tiny_tuned), "--max-new-tokens", "4", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "error: that line is not UTF-8 text (the byte 0xff at character 1); type it as UTF-8" in captured.err
    assert captured.out.strip()  # the next line, 春夜, was answered


# -----------------------------------------------------------------------------
# (8) Tools inside the one error path


@pytest.mark.parametrize("argv, message", [
    (["--n-head", "3"], "error: --n-head 3 --n-embd 16 (the default block: RoPE): --n-embd (16) must be divisible "
                        "by --n-head (3)"),
    (["--n-embd", "6"], "positions 'rope' needs an even head size, got 3"),
    (["--repeats", "0"], "error: --repeats must be positive, got 0"),
    (["--steps", "0"], "error: --steps must be positive, got 0"),
    (["--batch-size", "0"], "error: --batch-size must be positive, got 0"),
    (["--gen-batch", "0"], "error: --gen-batch must be positive, got 0"),
    (["--block-size", "0"], "error: --block-size must be positive, got 0"),
    (["--vocab-size", "3"], "the generation figures' prompts draw ids from 5 up"),
    (["--device", "tpu"], "error: --device tpu: not a device name"),
    (["--rep", "2"], "error: unrecognized arguments: --rep 2"),
])
def test_bench_refuses_bad_flags_in_one_line(argv, message, capsys):
    assert message in one_line_error(bench.main, [*BENCH, *argv], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "error: --repeats must be positive, got 0"),
    (["--tuning", "--n-head", "3", "--poems", "/nonexistent"], "--n-embd (16) must be divisible by --n-head (3)"),
])
def test_profile_step_refuses_bad_flags_before_loading_anything(argv, message, capsys):
    assert message in one_line_error(profile_step.main, [*BENCH[:14], *argv], capsys)


@pytest.mark.parametrize("main, argv", [
    (corpus_tool.main, ["--tok", "char"]),
    (poems_download.main, ["--de", "x"]),
    (compare_lora.main, ["--rank", "0"]),
    (merge_lora.main, ["--over"]),
])
def test_the_tools_refuse_abbreviated_flags(main, argv, capsys):
    assert one_line_error(main, argv, capsys).startswith("error: unrecognized arguments: ")


class ClosingPipe(io.TextIOWrapper):
    """A stdout whose reader goes away after `lines` lines (as `| head -2`): every write or
    flush after that raises BrokenPipeError, as a real closed pipe does."""

    def __init__(self, lines: int):
        super().__init__(io.BytesIO(), encoding="utf-8")
        self.left = lines

    def write(self, text: str) -> int:
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.left -= text.count("\n")
        return super().write(text)

    def flush(self) -> None:
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_stdout_never_stops_a_training_run(tmp_path, small_poems, monkeypatch):
    """`pretrain.py ... | head -2` used to end the run at its next print, before it saved."""
    monkeypatch.setattr(sys, "stdout", ClosingPipe(lines=2))
    out = tmp_path / "ckpt.pt"
    pretrain.main(["--poems", str(small_poems), "--out", str(out), *TINY, "--max-iters", "3", "--eval-interval", "3",
                   "--log-interval", "1", "--device", "cpu"])
    assert load_checkpoint(out)["step"] == 3


def test_a_closed_stdout_ends_a_tool_whose_output_is_its_product_quietly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", ClosingPipe(lines=1))
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*BENCH, "--only", "generate"])
    assert exit_info.value.code == 0 and capsys.readouterr().err == ""


def read_one_line_then_close(argv: list[str]) -> subprocess.CompletedProcess:
    """Run a command under a real pipe whose reader takes one line and leaves (`| head -1`)."""
    process = subprocess.Popen([sys.executable, "-u", *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    return subprocess.CompletedProcess(argv, process.wait(), first.decode(), err)


@pytest.mark.slow
def test_corpus_tool_under_head_ends_quietly(small_poems):
    result = read_one_line_then_close(["-m", "tools.corpus", "--poems", str(small_poems)])
    assert result.returncode == 0 and result.stdout.startswith("corpus: ")
    assert "Error" not in result.stderr and "Exception" not in result.stderr, result.stderr


@pytest.mark.slow
def test_pretrain_under_head_trains_to_the_end_and_saves(tmp_path, small_poems):
    out = tmp_path / "ckpt.pt"
    result = read_one_line_then_close(["pretrain.py", "--poems", str(small_poems), "--out", str(out), *TINY,
                                       "--max-iters", "3", "--eval-interval", "3", "--log-interval", "1",
                                       "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    assert "Error" not in result.stderr and "Exception" not in result.stderr, result.stderr
    assert load_checkpoint(out)["step"] == 3


# -----------------------------------------------------------------------------
# merge_lora: no output is one of its inputs


def tiny_base_and_adapters(folder: Path) -> tuple[Path, Path]:
    """base.pt (a tiny model) and lora.pt (rank-2 adapters on it), built in memory: no training."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer("char", ["春眠不覺曉處處聞啼鳥"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    base, adapters = folder / "base.pt", folder / "lora.pt"
    save_checkpoint(base, model_checkpoint("sft", model, tokenizer))
    spec = {"rank": 2, "alpha": 4.0, "targets": "all", "dropout": 0.0, "token_ids": [], "base": str(base.resolve()),
            "base_fingerprint": model_fingerprint(model.state_dict())}
    add_adapters(model, 2, 4.0, "all", 0.0, [])
    save_checkpoint(adapters, model_checkpoint("sft", model, tokenizer, lora=spec))
    return base, adapters


@pytest.mark.parametrize("out_is", ["recorded base", "given base", "hard link of the adapters", "base beside"])
def test_merge_lora_never_writes_over_one_of_its_inputs(tmp_path, capsys, out_is):
    base, adapters = tiny_base_and_adapters(tmp_path / "runs")
    argv = ["--ckpt", str(adapters), "--overwrite"]
    if out_is == "recorded base":
        argv += ["--out", str(base)]
    elif out_is == "given base":
        moved = tmp_path / "moved.pt"
        shutil.copy(base, moved)
        argv += ["--base", str(moved), "--out", str(moved)]
    elif out_is == "hard link of the adapters":
        os.link(adapters, tmp_path / "link.pt")
        argv += ["--out", str(tmp_path / "link.pt")]
    else:  # the recorded path is gone; the base beside the adapters is the one read
        ckpt = load_checkpoint(adapters)
        ckpt["lora"]["base"] = str(tmp_path / "gone" / "base.pt")
        save_checkpoint(adapters, ckpt)
        argv += ["--out", str(base)]
    before = {p: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    err = one_line_error(merge_lora.main, argv, capsys)
    assert "which this run reads; give another --out" in err
    assert {p: p.read_bytes() for p in (tmp_path / "runs").iterdir()} == before


def test_merge_lora_out_that_cannot_be_a_file_is_refused_before_merging(tmp_path, capsys):
    _, adapters = tiny_base_and_adapters(tmp_path / "runs")
    (tmp_path / "folder").mkdir()
    assert "is a folder" in one_line_error(merge_lora.main, ["--ckpt", str(adapters), "--out", str(tmp_path / "folder"),
                                                             "--overwrite"], capsys)
    assert "since" in one_line_error(merge_lora.main, ["--ckpt", str(adapters), "--out",
                                                       str(adapters / "merged.pt")], capsys)
    merge_lora.main(["--ckpt", str(adapters), "--out", str(tmp_path / "merged.pt")])  # and a good one merges
    assert "lora" not in load_checkpoint(tmp_path / "merged.pt")


# -----------------------------------------------------------------------------
# compare_lora: fingerprinted leftovers, atomic and checked figures, its own flags, its inputs


FAKE_FINETUNE = """
import json, shutil, sys
argv = sys.argv[1:]
out = argv[argv.index("--out") + 1]
with open("calls.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(argv) + "\\n")
if "--fail" in argv:
    sys.exit(3)
shutil.copy({template!r}, out)
with open(out[:-3] + ".log.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({{"step": 1, "seconds_per_step": 0.5}}) + "\\n" + json.dumps({{"step": 2, "val_loss": 3.25}}) + "\\n")
"""

FAKE_EVALUATE = """
import json, sys
argv = sys.argv[1:]
ckpt = argv[argv.index("--ckpt") + 1]
if {fail}:
    sys.exit(1)
print(json.dumps({{"checkpoints": {{ckpt: {{"parameters": 1000, "stop_rate": 0.5, "regular_form_rate": 0.25,
                                           "title_gain": 1.5}}}}}}))
"""


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    """compare_lora's runs are finetune.py and evaluate.py in its REPO: here, stand-ins that
    write a checkpoint, a log and a report in a blink, and log how they were called."""
    repo = tmp_path / "repo"
    base, _ = tiny_base_and_adapters(tmp_path / "models")
    ckpt = load_checkpoint(base)
    template = tmp_path / "models" / "trained.pt"
    save_checkpoint(template, {**ckpt, "step": 2})
    repo.mkdir()
    (repo / "finetune.py").write_text(FAKE_FINETUNE.format(template=str(template)), encoding="utf-8")
    (repo / "evaluate.py").write_text(FAKE_EVALUATE.format(fail=False), encoding="utf-8")
    monkeypatch.setattr(compare_lora, "REPO", repo)
    poems = tmp_path / "poems"
    poems.mkdir()
    (poems / "a.json").write_text('[{"title": "春曉", "paragraphs": ["春眠不覺曉，處處聞啼鳥。"]}]', encoding="utf-8")
    return repo, base, poems


def compare_argv(base: Path, poems: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--init", str(base), "--poems", str(poems), "--out-dir", str(out_dir), "--ranks", "0", "--max-iters", "2",
            "--num-titles", "2", *extra]


def calls(repo: Path) -> list[list[str]]:
    path = repo / "calls.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_compare_lora_measures_once_and_reprints(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    table = compare_lora.main(compare_argv(base, poems, tmp_path / "runs"))
    assert "| full | 1,000 (100.00%)" in table and "3.250" in table and len(calls(repo)) == 1
    assert compare_lora.main(compare_argv(base, poems, tmp_path / "runs")) == table and len(calls(repo)) == 1
    assert json.loads((tmp_path / "runs" / "r0.evaluate.json").read_text(encoding="utf-8"))["checkpoints"]


@pytest.mark.parametrize("change", ["max_iters", "finetune_flags", "init_weights", "corpus", "no record"])
def test_compare_lora_never_continues_a_leftover_run_of_other_settings(fake_repo, tmp_path, capsys, change):
    """A run killed after its first save leaves r0.pt: resumed only under the settings it was started with."""
    repo, base, poems = fake_repo
    out_dir = tmp_path / "runs"
    compare_lora.main(compare_argv(base, poems, out_dir))
    (out_dir / "r0.json").unlink()  # as if killed before it was measured
    extra: list[str] = []
    if change == "max_iters":
        argv = compare_argv(base, poems, out_dir)
        argv[argv.index("--max-iters") + 1] = "5"
    else:
        argv = compare_argv(base, poems, out_dir)
    if change == "finetune_flags":
        extra = ["--finetune-flags", "--lora-alpha 32"]
    elif change == "init_weights":
        ckpt = load_checkpoint(base)
        ckpt["model"] = {k: v + 1 for k, v in ckpt["model"].items()}
        save_checkpoint(base, ckpt)
    elif change == "corpus":
        (poems / "b.json").write_text('[{"title": "秋思", "paragraphs": ["洞庭秋水遠，雲夢晚山青。"]}]',
                                      encoding="utf-8")
    elif change == "no record":
        (out_dir / "r0.settings.json").unlink()
    err = one_line_error(compare_lora.main, [*argv, *extra], capsys)
    assert "r0.pt was" in err and "give another --out-dir" in err
    assert (change if change != "no record" else "settings were not recorded") in err
    assert len(calls(repo)) == 1  # nothing resumed


def test_compare_lora_resumes_a_leftover_run_of_the_same_settings(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    out_dir = tmp_path / "runs"
    compare_lora.main(compare_argv(base, poems, out_dir))
    (out_dir / "r0.json").unlink()
    compare_lora.main(compare_argv(base, poems, out_dir))
    assert calls(repo)[-1][:2] == ["--resume", "--out"]
    capsys.readouterr()
    compare_lora.main(compare_argv(base, poems, out_dir)[:-2] + ["--num-titles", "3"])  # figures only: measured again
    assert "measuring rank 0 again on 3" in capsys.readouterr().out and len(calls(repo)) == 2


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "r0.json: not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "val_loss": None}), "r0.json: 'val_loss' is None, not a number"),
    (lambda text: "[]", "r0.json: expected a JSON object of figures"),
])
def test_compare_lora_checks_the_figures_it_reads_back(fake_repo, tmp_path, capsys, damage, message):
    repo, base, poems = fake_repo
    out_dir = tmp_path / "runs"
    compare_lora.main(compare_argv(base, poems, out_dir))
    figures = out_dir / "r0.json"
    figures.write_text(damage(figures.read_text(encoding="utf-8")), encoding="utf-8")
    err = one_line_error(compare_lora.main, compare_argv(base, poems, out_dir), capsys)
    assert message in err and "delete it to measure rank 0 again" in err


@pytest.mark.parametrize("flags", ["--lora-rank 8", "--lora-rank=8", "--init x.pt", "--resume", "--no-overwrite",
                                   "--max-iters 9", "--poems p", "--out o.pt", "--log-interval 5"])
def test_compare_lora_refuses_finetune_flags_it_sets_itself(fake_repo, tmp_path, capsys, flags):
    """--finetune-flags '--lora-rank 8' used to train rank 8 in the row labelled "full"."""
    repo, base, poems = fake_repo
    err = one_line_error(compare_lora.main, compare_argv(base, poems, tmp_path / "runs", f"--finetune-flags={flags}"),
                         capsys)
    assert f"--finetune-flags: {flags.split()[0]} is set by compare_lora itself" in err
    assert not calls(repo) and not (tmp_path / "runs").exists()


def test_compare_lora_passes_quoted_finetune_flags_as_a_shell_would(fake_repo, tmp_path):
    repo, base, poems = fake_repo
    compare_lora.main(compare_argv(base, poems, tmp_path / "runs", "--finetune-flags", "--sample-titles '春夜 喜雨'"))
    assert calls(repo)[0][-2:] == ["--sample-titles", "春夜 喜雨"]


def test_compare_lora_refuses_an_unbalanced_quote(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    err = one_line_error(compare_lora.main, compare_argv(base, poems, tmp_path / "runs", "--finetune-flags",
                                                         "--sample-titles '春夜"), capsys)
    assert "--finetune-flags" in err and "quotation" in err


def test_compare_lora_outputs_are_never_its_inputs(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    shutil.copy(base, out_dir / "r0.pt")
    before = (out_dir / "r0.pt").read_bytes()
    err = one_line_error(compare_lora.main, compare_argv(out_dir / "r0.pt", poems, out_dir), capsys)
    assert "r0.pt is --init" in err and "which this run reads" in err
    assert (out_dir / "r0.pt").read_bytes() == before and not calls(repo)
    err = one_line_error(compare_lora.main, compare_argv(base, poems, poems), capsys)
    assert "is the --poems folder" in err and not calls(repo)


def test_compare_lora_out_dir_that_is_a_file_is_one_line(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    (tmp_path / "afile").write_text("x")
    err = one_line_error(compare_lora.main, compare_argv(base, poems, tmp_path / "afile"), capsys)
    assert "--out-dir" in err and "is a file" in err


def test_compare_lora_a_failing_run_is_one_line(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    (repo / "evaluate.py").write_text(FAKE_EVALUATE.format(fail=True), encoding="utf-8")
    err = one_line_error(compare_lora.main, compare_argv(base, poems, tmp_path / "runs"), capsys)
    assert "evaluate.py failed (exit 1)" in err and "the same command continues" in err
    assert not (tmp_path / "runs" / "r0.evaluate.json").exists()
    err = one_line_error(compare_lora.main, compare_argv(base, poems, tmp_path / "runs2", "--finetune-flags=--fail"),
                         capsys)
    assert "finetune.py failed (exit 3)" in err


def test_compare_lora_a_run_killed_before_its_first_save_starts_again(fake_repo, tmp_path, capsys):
    """Its log (and peak) were left without a checkpoint: finetune.py refused to start over them."""
    repo, base, poems = fake_repo
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    (out_dir / "r0.log.jsonl").write_text('{"step": 1', encoding="utf-8")
    (out_dir / "r0.rss").write_text(str(2**40), encoding="utf-8")
    compare_lora.main(compare_argv(base, poems, out_dir))
    assert "--overwrite" in calls(repo)[0]
    assert json.loads((out_dir / "r0.json").read_text(encoding="utf-8"))["peak_rss_bytes"] < 2**40


def test_compare_lora_refuses_a_rank_given_twice(fake_repo, tmp_path, capsys):
    repo, base, poems = fake_repo
    argv = compare_argv(base, poems, tmp_path / "runs")
    argv[argv.index("--ranks") + 1] = "4,4"
    assert "lists a rank twice" in one_line_error(compare_lora.main, argv, capsys)


# -----------------------------------------------------------------------------
# poems.download: one line for a --dest or --base-url it cannot use


def test_download_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    err = one_line_error(poems_download.main, ["--dest", str(tmp_path / "afile"), "--base-url",
                                               "http://127.0.0.1:9/"], capsys)
    assert "is a file, not a folder" in err


def test_download_from_a_url_without_a_scheme_is_one_line(tmp_path, capsys):
    err = one_line_error(poems_download.main, ["--dest", str(tmp_path), "--base-url", "mirror.example/poems"], capsys)
    assert "not an http://, https:// or file:// URL" in err and not list(tmp_path.iterdir())


def test_download_over_a_folder_named_as_a_corpus_file_is_one_line(tmp_path):
    (tmp_path / "poet.tang.0.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        download_corpus(tmp_path, base_url="http://127.0.0.1:9/", names=["poet.tang.0.json"])

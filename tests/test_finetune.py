"""Instruction tuning: label alignment (the loss mask), padded batches, --data, and finetune.py end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from data.instruct import (
    IGNORE,
    INSTRUCTION,
    EpochBatches,
    InstructionDataError,
    Sample,
    encode_sample,
    encode_samples,
    load_instruction_jsonl,
    pad_batch,
    prompt_ids,
    prompt_text,
)
from data.tasks import DEFAULT_TASKS, TASKS, task_instruction
from data.tokenizer import EOT, RES
import finetune
from model import GPT, GPTConfig

SAMPLE = Sample(INSTRUCTION, "春曉", "春眠不覺曉，\n處處聞啼鳥。")


def test_prompt_format():
    assert prompt_text(INSTRUCTION, "春夜喜雨") == "<INS>請用以下題目寫一首詩<INP>春夜喜雨<RES>"


# -----------------------------------------------------------------------------
# The loss mask, pinned exactly


def test_labels_start_at_res_and_end_with_end_of_text(char_tokenizer):
    tok = char_tokenizer
    inputs, labels, response_labels = encode_sample(tok, SAMPLE)
    prompt, response_ids = prompt_ids(tok, SAMPLE.instruction, SAMPLE.input), tok.encode(SAMPLE.response)
    ids = prompt + response_ids + [tok.eot_id]
    assert inputs == ids[:-1] and len(labels) == len(inputs)
    labelled = [i for i, label in enumerate(labels) if label != IGNORE]
    first, last = labelled[0], labelled[-1]
    # the first labelled position is <RES>, and it predicts the poem's first character
    assert inputs[first] == tok.special_ids[RES] and labels[first] == tok.encode("春")[0]
    assert first == len(prompt) - 1
    # the last one predicts end-of-text, at the last position
    assert labels[last] == tok.eot_id and last == len(inputs) - 1
    # every response token and the end-of-text are labelled, contiguously; the prompt is not
    assert labelled == list(range(first, last + 1))
    assert [labels[i] for i in labelled] == response_ids + [tok.eot_id]
    assert response_labels == labels


def test_loss_on_all_labels_every_position_but_reports_response_only(char_tokenizer):
    tok = char_tokenizer
    inputs, labels, response_labels = encode_sample(tok, SAMPLE, loss_on="all")
    assert IGNORE not in labels and labels == (inputs + [tok.eot_id])[1:]
    assert labels[0] == tok.encode("請")[0]  # <INS> predicts the instruction's first character
    assert response_labels == encode_sample(tok, SAMPLE)[1]
    with pytest.raises(ValueError):
        encode_sample(tok, SAMPLE, loss_on="prompt")


def test_padding_carries_no_label_and_pads_to_the_longest_row(char_tokenizer):
    tok = char_tokenizer
    short = encode_sample(tok, Sample("寫", "甲", "一。"))
    long = encode_sample(tok, SAMPLE)
    x, y = pad_batch([(short[0], short[1]), (long[0], long[1])], pad_id=tok.eot_id)
    assert x.shape == y.shape == (2, len(long[0]))  # the longest row, not block_size
    assert (y[0, len(short[0]):] == IGNORE).all()
    assert (y[0, : len(short[0])] == torch.tensor(short[1])).all()
    assert (x[1] == torch.tensor(long[0])).all()


def test_padding_does_not_change_a_rows_loss(char_tokenizer):
    """A row's loss is the same alone and padded in a batch beside a longer row."""
    tok = char_tokenizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    short = encode_sample(tok, Sample("寫", "甲", "一二三。"))
    long = encode_sample(tok, SAMPLE)
    x, y = pad_batch([(short[0], short[1])], tok.eot_id)
    _, alone = model(x, y)
    x, y = pad_batch([(short[0], short[1]), (long[0], [IGNORE] * len(long[1]))], tok.eot_id)
    _, padded = model(x, y)
    assert torch.allclose(alone, padded, atol=1e-6)


# -----------------------------------------------------------------------------
# --data files


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines),
                    encoding="utf-8")
    return path


def test_instruction_records_become_samples(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "寫詩", "input": "秋", "output": "秋風起。"}, "",
                                               {"instruction": "對句", "input": "", "output": "白日依山盡"}])
    samples = load_instruction_jsonl(path)
    assert samples == [Sample("寫詩", "秋", "秋風起。"), Sample("對句", "", "白日依山盡")]


@pytest.mark.parametrize("bad, expected", [
    ('{"instruction": "a", "input": "b"', r"d\.jsonl:2: not valid JSON"),
    ({"instruction": "a", "output": "c"}, r"d\.jsonl:2: missing or non-string field\(s\) input"),
    ({"instruction": "a", "input": "b", "output": 3}, r"d\.jsonl:2: missing or non-string field\(s\) output"),
    (["a", "b"], r"d\.jsonl:2: expected a JSON object"),
])
def test_malformed_instruction_lines_name_file_and_line(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "寫", "input": "甲", "output": "乙"}, bad])
    with pytest.raises(InstructionDataError, match=expected):
        load_instruction_jsonl(path)


@pytest.mark.parametrize("field, text", [("output", f"白日依山盡{EOT}黃河入海流"), ("input", "秋<RES>"),
                                         ("instruction", "<INS>寫詩")])
def test_data_records_that_spell_a_control_token_are_refused(tmp_path, field, text):
    record = {"instruction": "寫詩", "input": "秋", "output": "秋風起。", field: text}
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "寫", "input": "甲", "output": "乙"}, record])
    with pytest.raises(InstructionDataError, match=rf"d\.jsonl:2: field {field} contains the control token"):
        load_instruction_jsonl(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(InstructionDataError, match="--data .*: no such file"):
        load_instruction_jsonl(tmp_path / "nope.jsonl")


# -----------------------------------------------------------------------------
# finetune.py end to end


def tune(tmp_path: Path, poems: Path, init: Path | None, *args: str) -> list[str]:
    argv = ["--poems", str(poems), "--out", str(tmp_path / "sft.pt"), "--dtype", "float32", "--lr", "3e-3",
            "--warmup-iters", "5", "--batch-size", "8",
            "--sample-titles", "春夜喜雨,秋思", "--sample-tokens", "20", *args]
    return argv + (["--init", str(init)] if init else [])


def run_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "Traceback" not in err, err
    return last_line


@pytest.mark.slow
def test_finetune_writes_checkpoint_log_and_gallery(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--epochs", "2"))
    out = capsys.readouterr().out
    assert "loss on response tokens" in out and "steps per epoch" in out and "longer than block_size 96" in out
    ckpt = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert ckpt["kind"] == "sft" and ckpt["loss_on"] == "response"
    assert ckpt["tokenizer"] == torch.load(tiny_pretrained, weights_only=True)["tokenizer"]
    records = [json.loads(l) for l in (tmp_path / "sft.log.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert len(evals) == 2 and evals[-1]["step"] == ckpt["step"]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    gallery = (tmp_path / "sft.samples.txt").read_text(encoding="utf-8")
    assert gallery.index("=== epoch 0 (before training)") < gallery.index("=== epoch 1\n") < gallery.index("=== epoch 2\n")
    assert gallery.count("《春夜喜雨》") == 3 and gallery.count("《秋思》") == 3
    assert (tmp_path / "sft.loss.png").exists()


@pytest.mark.slow
def test_the_default_mixes_the_tasks_and_the_gallery_asks_each(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--max-iters", "2"))
    out = capsys.readouterr().out
    mixture = next(line for line in out.splitlines() if line.startswith(f"tasks {DEFAULT_TASKS}, drawn anew each epoch"))
    assert all(f" {task} " in mixture for task in TASKS)
    gallery = (tmp_path / "sft.samples.txt").read_text(encoding="utf-8")
    assert f"〔{task_instruction('acrostic')}〕\n春夏秋冬\n→" in gallery
    assert f"〔{task_instruction('form', '七言絕句')}〕\n春夜喜雨\n→" in gallery


@pytest.mark.slow
def test_tasks_book_is_the_single_task_run(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--max-iters", "2", "--tasks", "book"))
    out = capsys.readouterr().out
    assert "tasks book, drawn anew each epoch; epoch 1: poem " in out
    assert "〔" not in (tmp_path / "sft.samples.txt").read_text(encoding="utf-8")  # titles only


def test_the_learning_rate_follows_the_job_unless_given():
    mixture, book, given = (finetune.FinetuneConfig(), finetune.FinetuneConfig(tasks="book"),
                            finetune.FinetuneConfig(tasks="book", lr=5e-4, min_lr=0.0))
    for config in (mixture, book, given):
        config.fill_defaults()
    assert (mixture.lr, mixture.min_lr) == (1e-3, 1e-4)
    assert (book.lr, book.min_lr) == (3e-4, 3e-5)  # the book's run as it always was
    assert (given.lr, given.min_lr) == (5e-4, 5e-5)


def test_unknown_task_is_refused_before_the_corpus_loads(tmp_path, tiny_pretrained, capsys):
    line = run_error(tune(tmp_path, tmp_path / "no-poems", tiny_pretrained, "--tasks", "poem,rhyme"), capsys)
    assert "--tasks: unknown task rhyme" in line


@pytest.mark.slow
def test_loss_on_all_still_reports_response_loss(tmp_path, small_poems, tiny_pretrained):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--loss-on", "all", "--epochs", "1"))
    ckpt = torch.load(tmp_path / "sft.pt", weights_only=True)
    assert ckpt["loss_on"] == "all"
    records = [json.loads(l) for l in (tmp_path / "sft.log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any("val_loss" in r and math.isfinite(r["val_loss"]) for r in records)


def test_batches_are_seeded_epoch_shuffles(char_tokenizer):
    names = "春夏秋冬東南西北金木水火土日月星風雲雨雪"
    rows = [encode_sample(char_tokenizer, Sample("寫", c, "一" * (i % 5 + 1))) for i, c in enumerate(names)]

    def batches():
        return EpochBatches(rows, batch_size=4, seed=3, pad_id=char_tokenizer.eot_id)

    def titles(x):  # the character after <INP>
        inp = char_tokenizer.special_ids["<INP>"]
        return [char_tokenizer.decode([row[row.tolist().index(inp) + 1].item()]) for row in x]

    a, b = batches(), batches()
    assert a.steps_per_epoch == 5
    epoch0 = [a.batch(s)[0] for s in range(5)]
    assert all(torch.equal(x, b.batch(s)[0]) for s, x in enumerate(epoch0))  # a pure function of the step
    assert sorted(t for x in epoch0 for t in titles(x)) == sorted(names)  # each sample once per epoch
    epoch1 = [a.batch(s)[0] for s in range(5, 10)]
    assert [titles(x) for x in epoch1] != [titles(x) for x in epoch0]  # a new order each epoch


def test_micro_batches_and_ranks_split_a_step_without_overlap(char_tokenizer):
    rows = [encode_sample(char_tokenizer, Sample("寫", c, "一")) for c in "春夏秋冬東南西北金木水火土日月星"]
    whole = EpochBatches(rows, batch_size=8, seed=5)
    split = EpochBatches(rows, batch_size=2, grad_accum=2, world_size=2, seed=5)
    assert whole.steps_per_epoch == split.steps_per_epoch == 2
    for step in range(2):
        parts = [split.batch(step, micro, rank)[0] for micro in range(2) for rank in range(2)]
        assert torch.equal(torch.cat(parts), whole.batch(step)[0])


def test_length_buckets_cut_padding_and_keep_every_sample_once_in_a_pure_order(char_tokenizer):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (120,), generator=generator).tolist()
    rows = [encode_sample(char_tokenizer, Sample("寫", "春", "月" * n)) for n in lengths]
    plain = EpochBatches(rows, batch_size=4, seed=3)
    bucketed = EpochBatches(rows, batch_size=4, seed=3, length_buckets=True)
    assert bucketed.padding_share() < plain.padding_share() / 4
    steps = bucketed.steps_per_epoch
    for epoch in (0, 1):
        seen = [i for step in range(epoch * steps, (epoch + 1) * steps) for i in bucketed.indices(step)]
        assert sorted(seen) == list(range(120))  # each sample once per epoch
    assert bucketed.order(0) != bucketed.order(1)  # a new order each epoch
    widths = [bucketed.batch(step)[0].size(1) for step in range(steps)]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # the lengths come in random order
    fresh = EpochBatches(rows, batch_size=4, seed=3, length_buckets=True)  # a resumed run, asked a late step first
    assert torch.equal(fresh.batch(steps + 7)[0], bucketed.batch(steps + 7)[0])
    split = EpochBatches(rows, batch_size=2, grad_accum=2, seed=3, length_buckets=True)  # the same steps, in micro-batches
    assert sorted(split.indices(5, 0) + split.indices(5, 1)) == sorted(bucketed.indices(5))


def test_pieces_hold_the_batch_rows_sorted_by_length_with_less_padding(char_tokenizer):
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (96,), generator=generator).tolist()
    rows = [encode_sample(char_tokenizer, Sample("寫", "春", "月" * n)) for n in lengths]
    whole = EpochBatches(rows, batch_size=16, grad_accum=2, seed=3)
    cut = EpochBatches(rows, batch_size=16, grad_accum=2, seed=3, length_pieces=4)
    assert cut.padding_share() < whole.padding_share() / 2 and cut.padding_share(pieces=False) == whole.padding_share()

    def real_rows(x, y):  # each padded row, cut back to its length (its last label ends it)
        return sorted((tuple(r[: int((l != IGNORE).nonzero().max()) + 1].tolist()) for r, l in zip(x, y)))

    for step, micro in ((0, 0), (0, 1), (whole.steps_per_epoch + 2, 1)):  # the second epoch too
        pieces = cut.pieces(step, micro)
        assert len(pieces) == 4
        assert sorted(r for x, y in pieces for r in real_rows(x, y)) == real_rows(*whole.batch(step, micro))
        widths = [x.size(1) for x, _ in pieces]
        assert widths == sorted(widths) and widths[0] < widths[-1]
        fresh = EpochBatches(rows, batch_size=16, grad_accum=2, seed=3, length_pieces=4)  # a resumed run
        assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh.pieces(step, micro), pieces))
    assert len(EpochBatches(rows[:3], batch_size=3, length_pieces=4).pieces(0)) == 3  # no empty piece


def test_length_pieces_must_be_positive(tmp_path, small_poems, tiny_pretrained, capsys):
    line = run_error(tune(tmp_path, small_poems, tiny_pretrained, "--length-pieces", "0"), capsys)
    assert line == "error: --length-pieces must be positive, got 0"


def test_a_run_from_before_length_pieces_resumes_with_whole_batches(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--max-iters", "2"))
    assert "cut by length into 4 pieces" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "sft.pt", weights_only=True)
    del ckpt["train_config"]["length_pieces"]  # written before the flag existed
    torch.save(ckpt, tmp_path / "sft.pt")
    finetune.main(tune(tmp_path, small_poems, None, "--resume", "--max-iters", "3"))
    assert "cut by length" not in capsys.readouterr().out
    assert torch.load(tmp_path / "sft.pt", weights_only=True)["train_config"]["length_pieces"] == 1


def test_a_run_from_before_length_buckets_resumes_without_them(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--max-iters", "2", "--length-buckets"))
    assert "(length buckets)" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "sft.pt", weights_only=True)
    del ckpt["train_config"]["length_buckets"]  # written before the flag existed
    torch.save(ckpt, tmp_path / "sft.pt")
    finetune.main(tune(tmp_path, small_poems, None, "--resume", "--max-iters", "3"))
    assert "(no length buckets)" in capsys.readouterr().out
    assert torch.load(tmp_path / "sft.pt", weights_only=True)["train_config"]["length_buckets"] is False


def test_the_optimizer_follows_the_tasks_unless_given(tmp_path, small_poems, tiny_pretrained):
    """A mixture tunes with Muon, the book's one-task run with the AdamW it was measured with;
    --optimizer wins over both."""
    for args, expected in ((), "muon"), (("--tasks", "book"), "adamw"), (("--optimizer", "adamw"), "adamw"):
        finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--max-iters", "1", "--overwrite", *args))
        assert torch.load(tmp_path / "sft.pt", weights_only=True)["train_config"]["optimizer"] == expected


def test_samples_longer_than_the_block_are_dropped_not_truncated(char_tokenizer):
    short, long = Sample("寫", "甲", "一二三。"), Sample("寫", "乙", "一" * 40)
    kept, dropped = encode_samples(char_tokenizer, [short, long, short], block_size=20)
    assert dropped == 1 and len(kept) == 2 and all(row.labels[-1] == char_tokenizer.eot_id for row in kept)


def test_data_replace_tunes_on_the_file_alone(tmp_path, small_poems, tiny_pretrained, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "寫詩", "input": "秋", "output": "秋風起。"}] * 6)
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--data", str(data), "--data-mode", "replace",
                       "--epochs", "1"))
    assert "samples: train 6 " in capsys.readouterr().out


@pytest.mark.slow
def test_sft_checkpoint_as_init_is_allowed_with_a_note(tmp_path, small_poems, tiny_pretrained, capsys):
    finetune.main(tune(tmp_path, small_poems, tiny_pretrained, "--epochs", "1"))
    capsys.readouterr()
    finetune.main(tune(tmp_path / "again", small_poems, tmp_path / "sft.pt", "--epochs", "1"))
    assert "is already instruction-tuned; tuning it further" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Bad input: one clear line each


def test_init_not_given(tmp_path, small_poems, capsys):
    assert "--init: give the checkpoint to tune, e.g. --init ckpt.pt" in run_error(tune(tmp_path, small_poems, None), capsys)


def test_init_missing(tmp_path, small_poems, capsys):
    err = run_error(tune(tmp_path, small_poems, tmp_path / "nope.pt"), capsys)
    assert "--init: no checkpoint at" in err


def test_init_not_a_checkpoint(tmp_path, small_poems, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    err = run_error(tune(tmp_path, small_poems, tmp_path / "notes.pt"), capsys)
    assert "--init: " in err and "is not a readable checkpoint" in err


def test_init_truncated(tmp_path, small_poems, tiny_pretrained, capsys):
    data = tiny_pretrained.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    err = run_error(tune(tmp_path, small_poems, tmp_path / "cut.pt"), capsys)
    assert "is not a readable checkpoint" in err


def test_data_with_missing_fields(tmp_path, small_poems, tiny_pretrained, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "寫詩", "output": "秋風起。"}])
    err = run_error(tune(tmp_path, small_poems, tiny_pretrained, "--data", str(data)), capsys)
    assert "d.jsonl:1: missing or non-string field(s) input" in err


def test_empty_finetune_split(tmp_path, tiny_pretrained, capsys):
    folder = tmp_path / "poems"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"title": "甲", "paragraphs": ["一二三，四五六七八。"]}],
                                              ensure_ascii=False), encoding="utf-8")
    err = run_error(tune(tmp_path, folder, tiny_pretrained), capsys)
    assert "the finetune-train split is empty" in err


def test_resume_needs_an_sft_checkpoint(tmp_path, small_poems, tiny_pretrained, capsys):
    import shutil

    shutil.copy(tiny_pretrained, tmp_path / "sft.pt")
    err = run_error(tune(tmp_path, small_poems, None, "--resume"), capsys)
    assert "is a pretrain checkpoint (pretrained), not a sft run" in err


@pytest.mark.slow
def test_help_documents_every_flag_with_its_default():
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    result = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ("--init", "--epochs", "--lr", "--batch-size", "--loss-on", "--data", "--sample-titles", "--resume",
                 "--out", "--device", "--seed", "--forms", "--format"):
        assert flag in result.stdout, flag
    assert "(default: ckpt_sft.pt)" in result.stdout and "(default: instruct)" in result.stdout
    help_text = " ".join(result.stdout.split())
    assert "response (the poem and end-of-text, the default)" in help_text  # --loss-on's default follows --format
    assert "assistant (every assistant turn, the default)" in help_text

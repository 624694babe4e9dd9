"""tools.bench and tools.profile_step on a tiny model: what they print, and their flags' errors."""

import re

import pytest
import torch

from tools import bench, profile_step

TINY = ["--vocab-size", "50", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "2", "--dtype", "float32", "--device", "cpu"]


def test_profile_step_times_every_part_and_they_add_up(capsys):
    profile_step.main([*TINY, "--repeats", "2", "--optimizer", "muon"])
    out = capsys.readouterr().out
    parts = re.findall(r"^  (.+?)\s+([\d.]+) ms\s+([\d.]+)%$", out, re.M)
    names = [name for name, _, _ in parts]
    assert names[0].startswith("data") and names[-1].startswith("optimizer (muon") and len(parts) == 6
    assert sum(float(share) for _, _, share in parts) == pytest.approx(100, abs=0.5)
    total = float(re.search(r"the step\s+([\d.]+) ms", out)[1])
    assert total == pytest.approx(sum(float(ms) for _, ms, _ in parts), abs=0.5)
    assert "output layer" in out and "16 positions a step" in out


def test_profile_step_profiles_finetunes_batches_and_their_padding(capsys, small_poems):
    """--tuning times finetune.py's batches: with length buckets far less of a step is padding."""
    shares = []
    for buckets in ("--length-buckets", "--no-length-buckets"):
        profile_step.main([*TINY, "--block-size", "96", "--batch-size", "8", "--repeats", "3", "--tuning", buckets,
                           "--poems", str(small_poems)])
        out = capsys.readouterr().out
        match = re.search(r"(\d+)% of them padding, (\d+)% labelled", out)
        assert match and "the step" in out
        shares.append(int(match[1]))
    assert shares[0] < shares[1]


def test_bench_prints_training_and_generation_figures(capsys):
    bench.main([*TINY, "--steps", "1", "--repeats", "1", "--new-tokens", "4", "--gen-batch", "2", "--no-compile-decode"])
    out = capsys.readouterr().out
    assert re.search(r"train: [\d,]+ tokens/s \| model [\d.]+ GFLOP/s of a measured [\d.]+ GFLOP/s matmul = MFU", out)
    assert re.search(r"generate 4 tokens, one sample, timed in turns \(1 round; each ratio the median of the "
                     r"rounds'\): [\d,]+ tokens/s with KV cache, [\d,]+ without", out)
    assert re.search(r"sampling the batch of 2's next ids \(temperature 0.8\): [\d.]+ ms with one uniform number a "
                     r"row \(model.draw\), [\d.]+ ms with torch.multinomial \([\d.]+x\)", out)
    assert "decoding step compiled" not in out


def test_bench_times_variants_in_turns_and_compares_them_round_by_round():
    """A load that comes and goes hits both variants of a round: their ratio is taken there."""
    calls = []
    variants = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = bench.in_turns(variants, 3, torch.device("cpu"))
    assert calls == ["a", "b"] * 3 and [len(t) for t in seconds.values()] == [3, 3]
    # Round 2 ran under load (both slow), and still b was twice as fast, as in round 1; the
    # ratio of the two variants' medians (3 / 3) would say they were as fast.
    assert bench.ratio({"a": [2.0, 8.0, 3.0], "b": [1.0, 4.0, 3.0]}, "a", "b") == 2.0
    assert bench.ratio({"a": [2.0, 9.0, 4.0], "b": [1.0, 1.0, 1.0]}, "b", "a") == 0.25


@pytest.mark.slow
def test_bench_times_the_compiled_decoding_step(capsys):
    bench.main([*TINY, "--only", "generate", "--repeats", "1", "--new-tokens", "4", "--gen-batch", "2"])
    out = capsys.readouterr().out
    assert re.search(r"decoding step compiled: one sample [\d,]+ tokens/s \([\d.]+x plain GPT code's loop\), batch "
                     r"of 2 [\d,]+ tokens/s \([\d.]+x eager\); its first call took [\d.]+ s \(compiling\), the "
                     r"batch's [\d.]+ s", out)


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        profile_step.main(["--optimizer", "sgd"])
    assert exit_info.value.code == 2 and "--optimizer" in capsys.readouterr().err

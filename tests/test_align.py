"""Preference tuning: the DPO loss by hand, pairs from one prompt, a frozen reference, exact
resume, and one clear line for each kind of bad input (align.py, preference.py, losses.py)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

import align
from data.corpus import Poem
from data.instruct import IGNORE
from data.tokenizer import CharTokenizer
from model import GPT, GPTConfig
from tanggpt import preference
from tanggpt.checkpoint import load_checkpoint, load_model, model_and_tokenizer
from tanggpt.device import setup_runtime
from tanggpt.generation import Answer
from tanggpt.lora import adapters_disabled
from tanggpt.losses import PreferenceBatch, dpo_loss, preference_loss, sequence_logprobs
from tanggpt.preference import Pair, build_pairs, judge, load_pairs, pair_batch, reference_logprobs
from tanggpt.rule_targets import rhyme_rows
from tests.test_prosody import CHUN_XIAO, CHUN_YE_XI_YU, DENG_GUAN_QUE_LOU, JING_YE_SI

KEEPS_TONES = [DENG_GUAN_QUE_LOU, CHUN_YE_XI_YU]
BREAKS_TONES = [JING_YE_SI, CHUN_XIAO]
RUNTIME_FLAGS = ["--no-compile", "--dtype", "float32", "--device", "cpu"]


def test_dpo_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    # Two pairs; the prompt is the first two tokens, so labels start at position 1.
    inputs = torch.tensor([[1, 2, 3, 4, 5], [1, 6, 7, 8, 0], [1, 2, 9, 9, 9], [1, 6, 5, 0, 0]])
    labels = torch.tensor([[IGNORE, 3, 4, 5, 10], [IGNORE, 7, 8, 10, IGNORE], [IGNORE, 9, 9, 9, 10],
                           [IGNORE, 5, 10, IGNORE, IGNORE]])
    reference = torch.tensor([-9.0, -7.5, -11.0, -6.0])
    beta = 0.5

    logits, _ = model(inputs)
    logps = []
    for row in range(4):  # by hand: sum of log-softmax at each labelled position
        total = 0.0
        for t in range(5):
            if labels[row, t] != IGNORE:
                p = torch.softmax(logits[row, t].detach().double(), dim=-1)[labels[row, t]]
                total += math.log(float(p))
        logps.append(total)
    expected = []
    for i in range(2):
        margin = beta * ((logps[i] - reference[i].item()) - (logps[i + 2] - reference[i + 2].item()))
        expected.append(-math.log(1 / (1 + math.exp(-margin))))

    assert sequence_logprobs(model, inputs, labels).tolist() == pytest.approx(logps, abs=1e-5)
    batch = PreferenceBatch(inputs, labels, reference)
    pure = preference_loss(model, batch, beta, sft_weight=0.0)
    assert pure.item() == pytest.approx(sum(expected) / 2, abs=1e-5)
    anchored = preference_loss(model, batch, beta, sft_weight=2.0)
    chosen_tokens = 4 + 3
    assert anchored.item() == pytest.approx(sum(expected) / 2 - 2.0 * (logps[0] + logps[1]) / chosen_tokens, abs=1e-5)
    # At the start (policy = reference) every pair's loss is log 2 and both rewards 0.
    same = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-5.0]), 0.1)
    assert same.losses.item() == pytest.approx(math.log(2))


def test_judging_known_poems():
    answer = lambda poem, stopped=True: Answer("題", poem, stopped)  # noqa: E731
    assert [judge("tonal", answer(p)) for p in KEEPS_TONES + BREAKS_TONES] == ["chosen"] * 2 + ["rejected"] * 2
    assert judge("tonal", answer("一二三四五六")) is None  # not shaped: tonal pairs compare shaped answers only
    assert judge("shape", answer("一二三四五六")) == "rejected" and judge("shape", answer(JING_YE_SI)) == "chosen"
    assert judge("tonal", answer(DENG_GUAN_QUE_LOU, stopped=False)) is None  # every answer in a pair stopped
    not_rhyming = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層天。"
    assert judge("rhyme", answer(JING_YE_SI)) == "chosen" and judge("rhyme", answer(not_rhyming)) == "rejected"


@pytest.fixture
def scripted_answers(monkeypatch):
    """Replace the sampler: the k-th answer to each title cycles through known poems, starting at a
    title-dependent place, so every title gets both kinds and a pair can be traced to its title."""
    asked: dict[str, list[str]] = {}

    def fake_answer_titles(model, tokenizer, titles, runtime, max_new_tokens, **kwargs):
        pool = KEEPS_TONES + BREAKS_TONES
        answers = []
        for title in titles:
            seen = asked.setdefault(title, [])
            poem = pool[(len(title) + len(seen)) % len(pool)]
            seen.append(poem)
            answers.append(Answer(title, poem, True))
        return answers

    monkeypatch.setattr(preference, "answer_titles", fake_answer_titles)
    return asked


@pytest.mark.slow
def test_a_pairs_answers_share_one_prompt(scripted_answers, char_tokenizer):
    titles = ["春", "夏日", "秋夜長", "冬至日作"]
    pairs, counts = build_pairs(None, char_tokenizer, titles, "tonal", 4, None, 96, 0.8, seed=0)
    assert counts.pairs == len(pairs) == 4 and counts.answers == 16
    for pair in pairs:
        assert pair.chosen in KEEPS_TONES and pair.rejected in BREAKS_TONES
        assert {pair.chosen, pair.rejected} <= set(scripted_answers[pair.title])
    batch = pair_batch(char_tokenizer, pairs)
    n = len(pairs)
    for i in range(n):  # the chosen row and the rejected row start with the same prompt, up to <RES>
        prompt_length = int((batch.labels[i] != IGNORE).nonzero()[0])  # the first labelled position is <RES>
        assert torch.equal(batch.inputs[i, : prompt_length + 1], batch.inputs[n + i, : prompt_length + 1])
        assert char_tokenizer.decode(batch.inputs[i, : prompt_length + 1].tolist()).endswith("<RES>")


def align_args(tmp_path: Path, poems: Path, init: Path | None, *extra: str, out: str = "dpo.pt") -> list[str]:
    head = ["--init", str(init)] if init else []
    return [*head, "--poems", str(poems), "--out", str(tmp_path / out), *RUNTIME_FLAGS, "--prompts", "6",
            "--val-share", "0.34", "--batch-size", "2", "--warmup-iters", "2", "--lr", "1e-3", "--eval-interval", "2",
            "--sample-tokens", "8", *extra]


def run_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        align.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # after the progress bars of any sampling
    assert line.startswith("error: ") and "Traceback" not in err
    return line


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_align_trains_the_policy_against_a_frozen_reference_and_resumes_exactly(
        tmp_path, small_poems, tiny_tuned, scripted_answers, capsys):
    init_hash = file_hash(tiny_tuned)
    figures = align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "6", out="straight.pt"))
    for key in ("val_loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "finetune_val_loss"):
        assert math.isfinite(figures[key])
    assert file_hash(tiny_tuned) == init_hash  # the reference checkpoint is never written

    # The cached reference log-probabilities are the --init model's, and the policy moved away from it.
    cache = json.loads((tmp_path / "straight.pairs.json").read_text(encoding="utf-8"))
    pairs = [Pair(**p) for p in cache["pairs"]]
    init_model, tokenizer, _ = load_model(tiny_tuned)
    runtime = setup_runtime("cpu", "float32")
    fresh = [Pair(p.title, p.chosen, p.rejected) for p in pairs]
    reference_logprobs(init_model, tokenizer, fresh, runtime)
    assert [p.reference_chosen for p in fresh] == pytest.approx([p.reference_chosen for p in pairs], abs=1e-4)
    policy, _, kind = load_model(tmp_path / "straight.pt")
    assert kind == "dpo"
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), init_model.state_dict().values()))
    log = [json.loads(line) for line in (tmp_path / "straight.log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in log if "reward_accuracy" in r] == [2, 4, 6]
    gallery = (tmp_path / "straight.samples.txt").read_text(encoding="utf-8")
    assert gallery.count("[ended with") + gallery.count("[no end-of-text") == gallery.count("絕句/律詩-shaped]") \
        + gallery.count("tonal pattern]")  # every poem of the gallery carries its prosody marks

    # Stopped at step 3, then resumed with no flags but --resume: the same weights as straight through.
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "3", out="split.pt"))
    capsys.readouterr()
    align.main(["--resume", "--out", str(tmp_path / "split.pt"), "--max-iters", "6", *RUNTIME_FLAGS])
    assert f"pairs: {len(pairs)} from" in capsys.readouterr().out  # the cache, not a second sampling
    resumed, _, _ = load_model(tmp_path / "split.pt")
    for (name, a), b in zip(policy.state_dict().items(), resumed.state_dict().values()):
        # Equal up to float rounding (a CPU kernel may add up in another order from run to run);
        # a wrong batch, learning rate or optimizer state would differ by orders of magnitude more.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_init_from_a_pretrained_checkpoint_is_refused(tmp_path, small_poems, tiny_pretrained, capsys):
    err = run_error(align_args(tmp_path, small_poems, tiny_pretrained), capsys)
    assert "is a pretrained checkpoint" in err and "finetune.py --init" in err
    assert not list(tmp_path.iterdir())  # refused before any work: nothing written


def test_no_pair_found_says_how_many_answers_of_each_kind(tmp_path, small_poems, tiny_tuned, monkeypatch, capsys):
    monkeypatch.setattr(preference, "answer_titles", lambda model, tokenizer, titles, *a, **k:
                        [Answer(t, JING_YE_SI, True) for t in titles])  # every answer breaks the tones
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned), capsys)
    assert "no preference pair found (tonal): 6 prompts, 24 answers: 0 could be chosen, 24 rejected -> 0 pairs" in err


@pytest.mark.slow
def test_a_pair_cache_from_other_settings(tmp_path, small_poems, tiny_tuned, scripted_answers, capsys):
    """This run's own cache (beside --out) is rebuilt, with a note; a cache named by --pairs is refused."""
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1"))
    key_before = load_pairs(tmp_path / "dpo.pairs.json", {})[1]
    assert "was built with" in key_before
    capsys.readouterr()
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1", "--prompts", "4", "--overwrite"))
    out = capsys.readouterr().out
    assert f"the pair cache {tmp_path / 'dpo.pairs.json'} was built with prompts 6, not 4" in out
    assert "rebuilding it" in out
    assert json.loads((tmp_path / "dpo.pairs.json").read_text(encoding="utf-8"))["key"]["prompts"] == 4
    err = run_error(align_args(tmp_path, small_poems, tiny_tuned, "--pairs", str(tmp_path / "dpo.pairs.json"),
                               out="other.pt"), capsys)
    assert "--pairs" in err and "was built with prompts 4, not 6" in err and "--overwrite" in err

    # A cache drawn by the sampler before model.draw (torch.multinomial: other ids for the same seed).
    cache = tmp_path / "dpo.pairs.json"
    data = json.loads(cache.read_text(encoding="utf-8"))
    del data["key"]["sampler"]
    cache.write_text(json.dumps(data), encoding="utf-8")
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "1", "--prompts", "4", "--overwrite"))
    assert f"the pair cache {cache} was built with sampler None, not 'inverse-cdf'; rebuilding it" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_a_run_from_before_the_sampler_was_recorded_resumes_on_its_own_pairs(tmp_path, small_poems, tiny_tuned,
                                                                              scripted_answers, capsys):
    """A run started when pairs were drawn by torch.multinomial (its checkpoint and cache record no
    sampler) resumes on the pairs it started with; a new run draws its own."""
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "2", out="old.pt"))
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    assert ckpt["sampler"] == "inverse-cdf"
    del ckpt["sampler"]
    torch.save(ckpt, tmp_path / "old.pt")
    cache = tmp_path / "old.pairs.json"
    data = json.loads(cache.read_text(encoding="utf-8"))
    del data["key"]["sampler"]
    cache.write_text(json.dumps(data), encoding="utf-8")
    capsys.readouterr()
    align.main(["--resume", "--out", str(tmp_path / "old.pt"), "--max-iters", "3", *RUNTIME_FLAGS])
    assert f"pairs: {len(data['pairs'])} from {cache}" in capsys.readouterr().out  # its cache, not drawn again
    assert "sampler" not in json.loads(cache.read_text(encoding="utf-8"))["key"]
    assert torch.load(tmp_path / "old.pt", weights_only=True)["sampler"] is None  # and so on at its next resume


@pytest.mark.parametrize("args, expected", [
    (["--beta", "0"], "--beta must be positive"),
    (["--samples-per-prompt", "1"], "--samples-per-prompt at least 2"),
    (["--val-share", "1"], "--val-share must be in (0, 1)"),
    (["--pair-temperature", "0"], "--pair-temperature must be positive"),
    (["--preference", "beauty"], "invalid choice: 'beauty'"),
])
def test_bad_flags_are_one_line(tmp_path, small_poems, tiny_tuned, capsys, args, expected):
    assert expected in run_error(align_args(tmp_path, small_poems, tiny_tuned, *args), capsys)


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        align.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--preference", "--beta", "--sft-weight", "--pairs", "--samples-per-prompt", "--val-share",
                 "--resume", "--overwrite"):
        assert flag in text
    assert "(default: tonal)" in text and "(default: 0.1)" in text


def test_rhyme_position_targets_point_at_the_rhymes_that_answer_earlier_ones():
    from tanggpt.rule_targets import rhyme_position_targets

    targets = rhyme_position_targets(CHUN_YE_XI_YU)
    assert [CHUN_YE_XI_YU[i] for i, _ in targets] == ["聲", "明", "城"]  # 生 is the first rhyme: nothing to answer
    assert {t.groups for _, t in targets} == {("下平聲八庚",)}
    assert [t.excluded for _, t in targets] == ["生", "生聲", "生聲明"]  # not to be repeated
    assert [JING_YE_SI[i] for i, _ in rhyme_position_targets(JING_YE_SI)] == ["鄉"]
    # 天 does not rhyme with 流: its place still asks for 流's group (what the policy should have written)
    stray = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層天。"
    assert [(stray[i], t.groups, t.excluded) for i, t in rhyme_position_targets(stray)] == [("天", ("下平聲十一尤",), "流")]
    assert rhyme_position_targets("一二三四五六") == []  # not shaped


def test_the_rhyme_rows_are_real_poems_that_rhyme():
    from tanggpt.rule_targets import rhyme_rows

    tokenizer = CharTokenizer.from_texts([CHUN_YE_XI_YU, JING_YE_SI, "白日依山盡，黃河入海流。欲窮千里目，更上一層天。"])
    poems = [Poem("春夜喜雨", CHUN_YE_XI_YU.split("\n")), Poem("登樓", ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層天。"])]
    rows, masks = rhyme_rows(tokenizer, poems, 128)
    assert len(rows) == 1  # the stray rhyme's poem is no example of rhyming
    labelled = [tokenizer.itos[rows[0].inputs[p + 1]] for p, label in enumerate(rows[0].labels) if label != IGNORE]
    assert labelled == ["聲", "明", "城"]
    sets = [label for label in rows[0].labels if label != IGNORE]
    assert masks.shape == (3, tokenizer.vocab_size)  # 八庚 less what already rhymed: 生; 生聲; 生聲明
    ids = {c: tokenizer.stoi[c] for c in "生聲明城"}
    assert [[bool(masks[s, ids[c]]) for c in "生聲明城"] for s in sets] == [
        [False, True, True, True], [False, False, True, True], [False, False, False, True]]


def test_rhyme_group_loss_is_minus_log_the_groups_probability():
    from tanggpt.losses import rhyme_group_loss

    torch.manual_seed(0)
    logits = torch.randn(5, 6)  # five labelled positions, two of them rhyme positions
    sets = torch.tensor([IGNORE, 0, IGNORE, IGNORE, 1])
    masks = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    p = torch.softmax(logits, dim=-1)
    by_hand = -(torch.log(p[1, 0] + p[1, 1]) + torch.log(p[4, 3] + p[4, 5])) / 2
    loss = rhyme_group_loss(torch.log_softmax(logits, dim=-1), sets, masks)
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)


def test_rhyme_rows_label_the_rhyme_characters_with_their_group(char_tokenizer, splits):
    rows, masks = rhyme_rows(char_tokenizer, splits["alignment"][:300], 128)
    assert rows and len(rows) < 300  # only the rhyming 絕句/律詩 that fit
    labelled = 0
    for row in rows:
        for position, set_index in enumerate(row.labels):
            if set_index != IGNORE:  # the token predicted there is the poem's own rhyme, inside its set
                rhyme = row.inputs[position + 1]  # (unless the poet repeated an earlier rhyme: 重韻)
                assert masks[set_index, rhyme] or rhyme in row.inputs[: position + 1]
                assert char_tokenizer.decode([row.inputs[position + 2]]) in "，。？！；：、\n"
                labelled += 1
    assert labelled >= len(rows)


def test_real_preference_pairs_the_titles_poem_over_the_models_answer(scripted_answers, char_tokenizer):
    titles, real = ["春", "夏日"], [CHUN_YE_XI_YU, DENG_GUAN_QUE_LOU]
    pairs, counts = build_pairs(None, char_tokenizer, titles, "real", 2, None, 96, 0.8, seed=0, real_poems=real)
    assert [(p.title, p.chosen) for p in pairs] == [("春", CHUN_YE_XI_YU), ("夏日", DENG_GUAN_QUE_LOU)]
    assert all(p.rejected in scripted_answers[p.title] for p in pairs)
    # 春's first answer is its real poem word for word: not a rejected answer, the next one is.
    assert scripted_answers["春"][0] == CHUN_YE_XI_YU and pairs[0].rejected == scripted_answers["春"][1]
    assert counts.chosen == 2 and counts.rejected == 4


def test_a_rhyme_already_used_is_not_a_target(char_tokenizer):
    poem = type("P", (), {"title": "春夜喜雨", "body": CHUN_YE_XI_YU})()
    rows, masks = rhyme_rows(char_tokenizer, [poem], 128)
    sets = [label for label in rows[0].labels if label != IGNORE]
    stoi = char_tokenizer.stoi
    assert masks[sets[0], stoi["聲"]] and not masks[sets[0], stoi["生"]]  # 4th line: any 八庚 character but 生
    assert masks[sets[2], stoi["城"]] and not any(masks[sets[2], stoi[c]] for c in "生聲明")
    assert masks[sets[2], stoi["情"]]  # another 八庚 character is still a rhyme


@pytest.mark.slow
def test_lora_alignment_tunes_adapters_against_the_same_network_with_them_off(
        tmp_path, small_poems, tiny_tuned, scripted_answers, capsys):
    align.main(align_args(tmp_path, small_poems, tiny_tuned, "--max-iters", "2", "--lora-rank", "4", out="lora.pt"))
    ckpt = load_checkpoint(tmp_path / "lora.pt")
    assert ckpt["kind"] == "dpo" and "wte.row_delta" in ckpt["model"]  # the special tokens' rows train too
    assert all(name.endswith((".lora_A", ".lora_B", ".row_delta")) for name in ckpt["model"])
    assert ckpt["lora"]["base_fingerprint"] == ckpt["init_fingerprint"]  # the reference is the adapters' base
    policy, _ = model_and_tokenizer(ckpt, tmp_path / "lora.pt", merge=False)
    init_model, _, _ = load_model(tiny_tuned)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with adapters_disabled(policy):
        assert torch.equal(policy.eval()(x)[0], init_model.eval()(x)[0])
    assert not torch.equal(policy(x)[0], init_model(x)[0])  # with them on: the policy has moved

    # Resumed without its pair cache: the pairs are rebuilt, and scored by the network with its
    # (now trained) adapters off, which gives the --init model's log-probabilities again.
    cache = tmp_path / "lora.pairs.json"
    before = json.loads(cache.read_text(encoding="utf-8"))["pairs"]
    cache.unlink()
    align.main(["--resume", "--out", str(tmp_path / "lora.pt"), "--max-iters", "4", *RUNTIME_FLAGS])
    after = json.loads(cache.read_text(encoding="utf-8"))["pairs"]
    assert [(p["chosen"], p["rejected"]) for p in after] == [(p["chosen"], p["rejected"]) for p in before]
    assert [p["reference_chosen"] for p in after] == pytest.approx([p["reference_chosen"] for p in before], abs=1e-4)
    assert load_checkpoint(tmp_path / "lora.pt")["step"] == 4

"""Stage 4, reinforcement learning (rl.py): GRPO's advantages and loss against hand computations,
the rollouts' rows, a run end to end, resume exact, and bad flags one line each."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import rl
from data.instruct import IGNORE, prompt_ids
from data.tokenizer import CharTokenizer
from model import GPT, GPTConfig
from tanggpt.losses import RolloutBatch, group_advantages, grpo_loss
from tanggpt.rewards import Reward
from tanggpt.rollouts import Request, Rollout, answer_shape, make_requests, parse_rl_tasks, rollout_rows
from tests.test_reliability import one_line_error


def test_advantages_are_each_reward_less_its_groups_mean():
    rewards = torch.tensor([1.0, 0.5, 0.0, 0.5, 0.2, 0.2, 0.2, 0.2])
    expected = [1 - 0.5, 0.5 - 0.5, 0 - 0.5, 0.5 - 0.5] + [0.0] * 4  # a group all alike: nothing to learn
    assert torch.allclose(group_advantages(rewards, 4), torch.tensor(expected))


def test_with_shapes_an_answer_is_compared_only_with_its_own_shape():
    rewards = torch.tensor([1.0, 0.5, 0.8, 0.2, 0.6, 0.6, 0.9, 0.3])
    shapes = torch.tensor([4, 4, 8, 8, 0, 0, 0, 0])  # 0: a task that fixes the shape, one comparison
    expected = [0.25, -0.25, 0.3, -0.3] + [0.6 - 0.6, 0.0, 0.9 - 0.6, 0.3 - 0.6]
    assert torch.allclose(group_advantages(rewards, 4, shapes), torch.tensor(expected), atol=1e-6)
    alone = group_advantages(torch.tensor([1.0, 0.5, 0.5, 0.5]), 4, torch.tensor([8, 4, 4, 4]))
    assert alone[0] == 0  # the only 律詩 of its group has nothing of its shape to be compared with


def test_the_shape_is_free_only_where_the_instruction_leaves_it():
    quatrain = "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。"
    assert answer_shape(Request("poem", "", "靜夜思"), quatrain) == 4
    assert answer_shape(Request("poem", "", "靜夜思"), quatrain + "\n" + quatrain) == 8
    # a continuation is judged with its given couplet: two more couplets make 6 clauses, nearer a 絕句
    assert answer_shape(Request("continue", "", "床前明月光，疑是地上霜。"), quatrain) == 4
    assert answer_shape(Request("continue", "", "床前明月光，疑是地上霜。"), quatrain + "\n" + quatrain) == 8
    assert answer_shape(Request("form", "", "靜夜思", "五言律詩"), quatrain) == 0
    assert answer_shape(Request("acrostic", "", "床疑舉低"), quatrain) == 0


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))


def rollout_batch() -> RolloutBatch:
    inputs = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 6, 7, 0, 0]])
    labels = torch.tensor([[IGNORE, 3, 4, 5, 9, IGNORE], [IGNORE, 6, 7, 9, IGNORE, IGNORE]])
    reference = torch.tensor([[0.0, -2.0, -2.5, -1.0, -3.0, 0.0], [0.0, -1.5, -2.0, -2.2, 0.0, 0.0]])
    return RolloutBatch(inputs, labels, torch.tensor([0.75, -0.25]), reference)


def by_hand(model: GPT, batch: RolloutBatch, kl_weight: float) -> torch.Tensor:
    """-(1/N) sum over answer tokens of A x log pi(token) + kl_weight x k3, written out token by token."""
    logits, _ = model(batch.inputs)
    total, count = torch.zeros(()), 0
    for row in range(len(batch.inputs)):
        for t in range(batch.inputs.size(1)):
            label = int(batch.labels[row, t])
            if label == IGNORE:
                continue
            logp = torch.log_softmax(logits[row, t].float(), dim=-1)[label]
            d = batch.reference_logps[row, t] - logp
            # the value of the policy term: -A (its ratio is 1); its gradient: -A x grad log pi
            total = total - batch.advantages[row] * torch.exp(logp - logp.detach()) + kl_weight * (d.exp() - d - 1)
            count += 1
    return total / count


@pytest.mark.parametrize("kl_weight", [0.0, 0.1])
def test_the_grpo_loss_and_its_gradient_equal_a_hand_computation(kl_weight):
    batch = rollout_batch()
    model = tiny()
    loss = grpo_loss(model, batch, kl_weight)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = by_hand(model, batch, kl_weight)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(got, want, atol=1e-6)
    # Token-level: the longer answer's 4 tokens and the shorter's 3 each weigh 1/7, so the value
    # without KL is -(4 x 0.75 + 3 x -0.25) / 7.
    if not kl_weight:
        assert loss.item() == pytest.approx(-(4 * 0.75 - 3 * 0.25) / 7)


def test_the_rule_targets_add_their_allowed_sets_log_probability_as_answer_tokens():
    base = rollout_batch()
    targets = torch.full(base.labels.shape, IGNORE)
    targets[0, 2], targets[0, 4], targets[1, 1] = 0, 1, 0  # three places a rule decides
    masks = torch.zeros(2, 11, dtype=torch.bool)
    masks[0, [4, 6]] = True  # e.g. a rhyme group
    masks[1, 9] = True  # e.g. an acrostic head
    batch = base._replace(target_labels=targets, target_masks=masks)
    model = tiny()
    loss = grpo_loss(model, batch, 0.1, target_weight=0.5)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    p = torch.softmax(model(batch.inputs)[0], dim=-1)
    sets = -(torch.log(p[0, 2, 4] + p[0, 2, 6]) + torch.log(p[0, 4, 9]) + torch.log(p[1, 1, 4] + p[1, 1, 6]))
    expected = by_hand(model, batch, 0.1) + 0.5 * sets / 7  # 7 answer tokens in all
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    for got, want in zip(ours, (p.grad for p in model.parameters())):
        assert torch.allclose(got, want, atol=1e-6)
    assert grpo_loss(model, batch, 0.1).item() == pytest.approx(by_hand(model, base, 0.1).item(), abs=1e-6)


def test_an_answer_above_its_group_is_made_more_likely():
    batch = rollout_batch()
    model = tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = by_hand_logps(model, batch)
    grpo_loss(model, batch, 0.0).backward()
    optimizer.step()
    after = by_hand_logps(model, batch)
    assert after[0] > before[0] and after[1] < before[1]  # advantage 0.75 up, -0.25 down


def by_hand_logps(model: GPT, batch: RolloutBatch) -> list[float]:
    with torch.no_grad():
        logps = torch.log_softmax(model(batch.inputs)[0], dim=-1)
    mask = batch.labels != IGNORE
    picked = logps.gather(-1, batch.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [float(picked[row][mask[row]].sum()) for row in range(len(batch.inputs))]


def test_a_rollouts_row_is_its_prompt_and_the_ids_it_sampled():
    tokenizer = CharTokenizer("春夜喜雨好知時節")
    request = Request("poem", "請用以下題目寫一首詩", "春夜喜雨")
    ids = tokenizer.encode("好雨")
    stopped = Rollout(request, [ids[0], ids[1], tokenizer.eot_id], "好雨", True, Reward(0.5, {}))
    cut = Rollout(request, tokenizer.encode("知時節"), "知時節", False, Reward(0.1, {}))
    prompt = prompt_ids(tokenizer, request.instruction, request.input)
    (inputs, labels), (cut_inputs, cut_labels) = rollout_rows(tokenizer, [stopped, cut])
    assert inputs == prompt + stopped.ids[:-1] and labels == [IGNORE] * (len(prompt) - 1) + stopped.ids
    # an answer cut at the length limit has no end-of-text to learn: only what was sampled is labelled
    assert cut_labels[-1] == tokenizer.encode("節")[0] and tokenizer.eot_id not in cut_labels
    assert len(cut_inputs) == len(cut_labels)


def test_rollouts_cut_by_length_give_the_gradient_of_the_whole_batch(splits, tiny_tuned, monkeypatch):
    """rl.py cuts each micro-batch's answers by length into pieces (less padding): with the KL
    and the rule targets, weighted by their answer tokens, the pieces' gradients add up to the
    whole batch's, and each answer keeps its group's advantage."""
    from data.instruct import EpochBatches
    from tanggpt.checkpoint import load_model
    from tanggpt.device import setup_runtime
    from tanggpt.distributed import Distributed
    from tanggpt.training import accumulate_gradients

    model, tokenizer, _ = load_model(tiny_tuned)
    reference, _, _ = load_model(tiny_tuned)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its reference: the KL term is not zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config = rl.RLConfig(dtype="float32", tasks="acrostic", batch_size=4, group_size=4, max_new_tokens=24,
                         kl_weight=0.1, target_weight=1.0, length_pieces=3)
    cpu = setup_runtime("cpu", "float32")
    requests = rl.prepare_requests(config, splits, tokenizer, model.config.block_size).prompts
    stage = rl.RLStage(config, model, reference, tokenizer, cpu, 0, EpochBatches(requests, 4, seed=1),
                       {}, [], [], {})
    # The tiny model's answers all score alike (advantage 0): give each answer its own instead,
    # so that an answer cut off from its advantage would change the gradient.
    monkeypatch.setattr(rl, "group_advantages", lambda rewards, *_: torch.linspace(-1, 1, len(rewards)))
    whole, pieces = stage.get_batch(0, 0), stage.pieces(0, 0)
    assert len(pieces) == 3 and sum(len(p.inputs) for p in pieces) == len(whole.inputs)
    assert sum(p.inputs.numel() for p in pieces) < whole.inputs.numel()
    assert whole.target_labels is not None and (whole.target_labels != IGNORE).any()

    def gradients(batches: list) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, batches, stage, cpu, Distributed())
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(gradients([whole]), gradients(pieces)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_requests_are_seeded_judgeable_and_held_out_phrasings_differ(splits):
    poems = splits["alignment"][:200]
    requests = make_requests(poems, parse_rl_tasks("all"), seed=3)
    assert requests == make_requests(poems, parse_rl_tasks("all"), seed=3)
    assert {r.task for r in requests} == {"poem", "form", "acrostic", "continue"}
    assert all(len(r.input) in (4, 8) for r in requests if r.task == "acrostic")  # the heads of a 絕句 or 律詩
    assert all(r.form and r.form in r.instruction for r in requests if r.task == "form")
    held = make_requests(poems, parse_rl_tasks("all"), seed=3, held_out=True)
    from data.tasks import TASKS
    assert all(r.instruction in {t.format(form=r.form) for t in TASKS[r.task].held_out} for r in held)
    assert not {r.instruction for r in held} & {r.instruction for r in requests}


def test_task_weights_set_how_often_each_task_is_asked(splits):
    poems = splits["alignment"][:1200]
    even = Counter(r.task for r in make_requests(poems, parse_rl_tasks("all"), seed=3))
    weighted = Counter(r.task for r in make_requests(poems, parse_rl_tasks("poem,form,acrostic:4,continue"), seed=3))
    assert weighted["acrostic"] > 2 * even["acrostic"] and weighted["poem"] < even["poem"]
    assert parse_rl_tasks("poem:2,acrostic") == {"poem": 2.0, "acrostic": 1.0}


def rl_argv(tmp_path: Path, poems: Path, init: Path | None, *extra: str, out: str = "rl.pt") -> list[str]:
    head = ["--init", str(init)] if init else []
    return [*head, "--poems", str(poems), "--out", str(tmp_path / out), "--dtype", "float32", "--batch-size", "2",
            "--group-size", "4", "--max-new-tokens", "24", "--eval-prompts", "3", "--sample-tokens", "8",
            "--warmup-iters", "1", "--lr", "1e-3", *extra]


def test_a_run_trains_logs_every_rule_and_saves_an_rl_checkpoint(tmp_path, small_poems, tiny_tuned, capsys):
    figures = rl.main(rl_argv(tmp_path, small_poems, tiny_tuned, "--max-iters", "2", "--eval-interval", "2"))
    ckpt = torch.load(tmp_path / "rl.pt", weights_only=True)
    assert ckpt["kind"] == "rl" and ckpt["step"] == 2
    evaluated = [json.loads(line) for line in (tmp_path / "rl.log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in evaluated if "val_loss" in r] == [0, 2]  # the --init model's figures first
    for kind in ("seen", "held_out"):
        for name in ("reward", "stop", "distinct_2", "alike_groups", "entropy", "kl", "pass rhyme", "pass no_repeat"):
            assert 0 <= figures[f"{kind} {name}"] or name == "kl", name
        assert 0 <= figures[f"{kind} reward"] <= 1
    assert "prompts:" in capsys.readouterr().out
    # The gallery's answers are held to --sample-tokens (8), not to the rollouts' --max-new-tokens (24).
    gallery = (tmp_path / "rl.samples.txt").read_text(encoding="utf-8")
    cut = gallery.count("[no end-of-text: cut at the length limit]")
    answers = [block.split("\n")[-2] for block in gallery.split("\n\n") if "cut at the length limit" in block]
    assert cut and all(len(answer) <= 8 for answer in answers)


@pytest.mark.parametrize("extra", [["--target-weight", "0"], []])
def test_a_resumed_run_is_the_same_run(tmp_path, small_poems, tiny_tuned, extra):
    straight = rl_argv(tmp_path, small_poems, tiny_tuned, "--max-iters", "4", "--eval-interval", "2", *extra, out="a.pt")
    rl.main(straight)
    rl.main(rl_argv(tmp_path, small_poems, tiny_tuned, "--max-iters", "2", "--eval-interval", "2", *extra, out="b.pt"))
    rl.main(["--out", str(tmp_path / "b.pt"), "--resume", "--max-iters", "4"])
    a, b = (torch.load(tmp_path / name, weights_only=True) for name in ("a.pt", "b.pt"))
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


@pytest.mark.parametrize("args, expected", [
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--tasks", "title"], "--tasks 'title': give `all` or a comma-separated list of poem, form, acrostic, continue"),
    (["--tasks", "poem,acrostic:0"], "--tasks: the weight of acrostic must be a positive number, got '0'"),
    (["--kl-weight", "-1"], "--kl-weight not negative"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--rhyme-weight", "-1"], "--rhyme-weight must not be negative"),
    (["--target-weight", "-1"], "--target-weight must not be negative"),
    (["--length-pieces", "0"], "--length-pieces must be positive, got 0"),
    (["--max-new-tokens", "200"], "no prompt leaves --max-new-tokens 200 of the model's block_size 96 free"),
])
def test_bad_flags_are_one_line(tmp_path, small_poems, tiny_tuned, capsys, args, expected):
    err = one_line_error(rl.main, rl_argv(tmp_path, small_poems, tiny_tuned, *args), capsys)
    assert expected in err


def test_a_pretrained_init_is_refused(tmp_path, small_poems, tiny_pretrained, capsys):
    err = one_line_error(rl.main, rl_argv(tmp_path, small_poems, tiny_pretrained), capsys)
    assert "is a pretrained checkpoint" in err and "finetune.py" in err


def test_rule_targets_on_a_tiktoken_model_are_refused_when_asked_and_left_out_by_default(tmp_path, small_poems,
                                                                                          capsys, monkeypatch):
    from tests.test_run_inputs import tiktoken_tuned

    bpe = tiktoken_tuned(tmp_path)
    monkeypatch.setattr(rl, "load_corpus", lambda *a, **k: pytest.fail("the corpus was loaded before the check"))
    err = one_line_error(rl.main, rl_argv(tmp_path, small_poems, bpe, "--target-weight", "1"), capsys)
    assert "--target-weight needs the char tokenizer" in err
    with pytest.raises(pytest.fail.Exception, match="the corpus was loaded"):  # the default goes on, without targets
        rl.main(rl_argv(tmp_path, small_poems, bpe))
    assert "no rule targets (--target-weight 0)" in capsys.readouterr().out


def test_a_run_from_before_the_rule_targets_and_the_pieces_resumes_without_them(tmp_path, small_poems, tiny_tuned):
    rl.main(rl_argv(tmp_path, small_poems, tiny_tuned, "--max-iters", "2", "--eval-interval", "2"))
    ckpt = torch.load(tmp_path / "rl.pt", weights_only=True)
    assert ckpt["train_config"]["target_weight"] == 1.0 and ckpt["train_config"]["length_pieces"] == 4
    del ckpt["train_config"]["target_weight"], ckpt["train_config"]["length_pieces"]  # before the flags existed
    torch.save(ckpt, tmp_path / "rl.pt")
    rl.main(["--out", str(tmp_path / "rl.pt"), "--resume", "--max-iters", "3"])
    saved = torch.load(tmp_path / "rl.pt", weights_only=True)["train_config"]
    assert saved["target_weight"] == 0.0 and saved["length_pieces"] == 1

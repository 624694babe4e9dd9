"""The training loop's pieces: token-weighted gradient accumulation and a stage's own loss."""

from __future__ import annotations

import json

import torch

from data.instruct import EpochBatches, Sample, encode_sample
from data.tokenizer import CharTokenizer
from model import GPT, GPT2_BLOCK, GPTConfig
from tanggpt.device import setup_runtime
from tanggpt.distributed import Distributed
from tanggpt.losses import causal_lm_loss
from tanggpt.training import Stage, TrainConfig, accumulate_gradients, train

CPU = setup_runtime("cpu", "float32")


class LMStage(Stage):
    """A stage made of the hooks a test passes in: the causal-LM loss unless told otherwise."""

    def __init__(self, get_batch=None, loss=causal_lm_loss):
        self.get_batch_fn, self.loss_fn = get_batch, loss
        self.kind, self.tokenizer, self.plot_title = "test", CharTokenizer("abc"), "test"

    def get_batch(self, step, micro_step):
        return self.get_batch_fn(step, micro_step)

    def loss(self, model, batch):
        return self.loss_fn(model, batch)

    def evaluate(self, model):
        return {"val_loss": 0.0}

    def sample(self, model, step):
        return ""


def tiny_model(vocab_size: int) -> GPT:
    """GPT-2's block: at initialisation it guesses uniformly, loss ln(vocab_size), which the
    tests below lean on. (The default block's RMSNorm and tied head already lean towards
    repeating the input token, which the copy task rewards.)"""
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, **GPT2_BLOCK))


def gradients(model: GPT, batches: list, stage: Stage) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batches, stage, CPU, Distributed())
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_weigh_every_token_alike(char_tokenizer):
    """Batch 32 in one go equals 4 micro-batches of 8, though each micro-batch pads to its own longest row."""
    lengths = [3 + (i * 7) % 40 for i in range(32)]  # responses of very different lengths
    rows = [encode_sample(char_tokenizer, Sample("寫", "春", "月" * n)) for n in lengths]
    whole = EpochBatches(rows, batch_size=32, seed=1, pad_id=char_tokenizer.eot_id)
    split = EpochBatches(rows, batch_size=8, grad_accum=4, seed=1, pad_id=char_tokenizer.eot_id)
    model, stage = tiny_model(char_tokenizer.vocab_size), LMStage()

    one_batch = gradients(model, [whole.batch(0)], stage)
    micro = [split.batch(0, m) for m in range(4)]
    accumulated = gradients(model, micro, stage)
    for a, b in zip(one_batch, accumulated):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    # Averaging the four micro-batch means instead (1 / grad_accum each) gives a visibly different gradient.
    model.zero_grad(set_to_none=True)
    for batch in micro:
        (causal_lm_loss(model, batch) / 4).backward()
    worst = max((a - p.grad).abs().max().item() for a, p in zip(one_batch, model.parameters()))
    assert worst > 1e-4


def test_pieces_cut_by_length_give_the_gradient_of_the_whole_batch(char_tokenizer):
    """finetune.py cuts each batch by length into pieces (less padding): weighted by their
    labels, the pieces' gradients add up to the whole batch's."""
    lengths = [3 + (i * 7) % 40 for i in range(24)]
    rows = [encode_sample(char_tokenizer, Sample("寫", "春", "月" * n)) for n in lengths]
    batches = EpochBatches(rows, batch_size=24, seed=1, pad_id=char_tokenizer.eot_id, length_pieces=3)
    model, stage = tiny_model(char_tokenizer.vocab_size), LMStage()
    pieces = batches.pieces(0)
    assert sum(x.numel() for x, _ in pieces) < batches.batch(0)[0].numel()
    for a, b in zip(gradients(model, [batches.batch(0)], stage), gradients(model, pieces, stage)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_loop_trains_on_the_stage_loss(tmp_path):
    """A stage's loss function is what the loop minimises and logs; batches come from get_batch."""
    calls = []

    def get_batch(step: int, micro: int):
        generator = torch.Generator().manual_seed(step * 10 + micro)
        x = torch.randint(20, (4, 16), generator=generator)
        return x, x  # learn to copy the input token: an easy loss to push down

    def doubled_loss(model, batch):
        calls.append(batch[0].shape)
        return 2 * causal_lm_loss(model, batch)

    model = tiny_model(20)
    config = TrainConfig(out=str(tmp_path / "ckpt.pt"), lr=1e-2, warmup_iters=0, grad_accum=2, eval_interval=30,
                         log_interval=1, dtype="float32", device="cpu")
    train(model, config, LMStage(get_batch, doubled_loss), CPU, max_iters=30)
    assert len(calls) == 30 * 2  # every micro-batch of every step
    records = [json.loads(line) for line in (tmp_path / "ckpt.log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[0] > 2 * 2.5 and losses[-1] < losses[0] / 2  # starts near 2 ln 20 (the doubled loss), falls
    assert "grad_scaler" not in torch.load(tmp_path / "ckpt.pt", weights_only=True)  # fp32: no loss scaling


def test_fp16_steps_scale_the_loss_skip_an_overflow_and_resume_the_scale(tmp_path):
    """Under fp16 autocast the loop scales the loss: a step whose gradients overflow is
    skipped and halves the scale, the checkpoint keeps the scale, and a resumed run goes on
    from it (a fresh scaler would start again at 65,536)."""
    fp16 = setup_runtime("cpu", "float16")
    calls = []

    def get_batch(step: int, micro: int):
        generator = torch.Generator().manual_seed(step)
        x = torch.randint(20, (4, 16), generator=generator)
        return x, x

    def loss(model, batch):
        calls.append(1)
        plain = causal_lm_loss(model, batch)
        return plain * 1e35 if len(calls) == 5 else plain  # step 4's gradients overflow at any scale

    model = tiny_model(20)
    config = TrainConfig(out=str(tmp_path / "ckpt.pt"), lr=1e-2, warmup_iters=0, eval_interval=20, log_interval=1,
                         dtype="float16", device="cpu")
    before_step_4 = {}

    def keep_weights(step, micro):
        if step == 4:
            before_step_4.update({n: p.detach().clone() for n, p in model.named_parameters()})
        if step == 5:
            moved = [n for n, p in model.named_parameters() if not torch.equal(p, before_step_4[n])]
            assert not moved  # step 4 was skipped
        return get_batch(step, micro)

    train(model, config, LMStage(keep_weights, loss), fp16, max_iters=20)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["grad_scaler"]["scale"] == 65536.0 / 2
    records = [json.loads(line) for line in (tmp_path / "ckpt.log.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r and r["train_loss"] < 1e6]
    assert losses[-1] < losses[0] / 2

    resumed = tiny_model(20)
    resumed.load_state_dict(ckpt["model"])
    train(resumed, config, LMStage(get_batch), fp16, max_iters=30, ckpt=ckpt)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["grad_scaler"]["scale"] == 65536.0 / 2

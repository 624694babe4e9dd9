"""Tests for model.py: the GPT, its loss, and sampling/generation with and without the KV cache.

All models are tiny and fp32 on the CPU; every test seeds torch itself.
"""

import math

import pytest
import torch

from model import GPT, GPT2_BLOCK, GPTConfig, head_cross_entropy, sample_next

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides}))


def peaky_model(seed=0, std=0.5):
    """Random weights large enough that greedy decoding depends on the context (no near-ties)."""
    model = tiny_model(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def greedy_alone(model, prompt, n, use_cache=True):
    return model.generate([prompt], n, temperature=0, use_cache=use_cache)[0]


# -----------------------------------------------------------------------------
# forward and loss


def test_causality_future_tokens_do_not_affect_past_logits():
    """Position t's logits depend on tokens <= t only; a later change shows up later."""
    model = tiny_model().eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 16))
    t = 6
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.randint(0, 62, changed[:, t + 1 :].shape)) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dict(vocab_size=9000, block_size=128, n_layer=4, n_head=4, n_embd=256),
    ],
    ids=["tiny", "reference-size"],
)
def test_loss_at_init_is_close_to_uniform(config):
    """A fresh model predicts near-uniformly: loss within 0.1 nats of ln(vocab_size)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).eval()
    V, T = config["vocab_size"], config["block_size"]
    idx = torch.randint(0, V, (8, T))
    targets = torch.randint(0, V, (8, T))
    with torch.no_grad():
        logits, _ = model(idx)
        none, loss = model(idx, targets)
    assert logits.shape == (8, T, V) and none is None
    assert abs(loss.item() - math.log(V)) < 0.1


def test_overfits_one_small_batch():
    """Model + loss + backward are wired so AdamW can memorise one fixed batch (< 0.1 loss)."""
    model = tiny_model(dropout=0.0)
    torch.manual_seed(1)
    data = torch.randint(0, 64, (4, 17))
    data[:, 0] = torch.arange(4)  # distinct first tokens: every context has one right answer
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(300):
        _, loss = model(x, y)
        if loss.item() < 0.1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


@pytest.mark.parametrize("chunk_size", [7, 512])
def test_head_cross_entropy_matches_the_plain_loss_and_its_gradients(chunk_size):
    """The chunked head-and-loss gives F.cross_entropy's value and gradients, for x and the head."""
    torch.manual_seed(0)
    x = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[0, 5, 29]] = -100
    plain = torch.nn.functional.cross_entropy(x @ weight.t(), targets, ignore_index=-100)
    (2 * plain).backward()  # a gradient other than 1 reaches backward's scaling
    plain_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    chunked = head_cross_entropy(x, weight, targets, chunk_size)
    (2 * chunked).backward()
    assert torch.allclose(chunked, plain, atol=1e-6)
    assert torch.allclose(x.grad, plain_grads[0], atol=1e-6)
    assert torch.allclose(weight.grad, plain_grads[1], atol=1e-6)
    frozen = weight.detach()  # a frozen head: only x gets a gradient
    x.grad = None
    head_cross_entropy(x, frozen, targets, chunk_size).backward()
    assert torch.allclose(x.grad, plain_grads[0] / 2, atol=1e-6)


def test_head_cross_entropy_keeps_small_gradients_under_fp16_autocast():
    """Under fp16 autocast (an older GPU's path) the head's gradients, scaled up as the
    gradient scaler scales them, match fp32's: each position's share of a mean over
    thousands of positions is below fp16's smallest normal number, so the gradients must
    pass through the fp16 matmuls unscaled by the count (they are, until backward).
    16,384 positions: the gpu preset's batch, 64 x 256."""
    torch.manual_seed(0)
    x = torch.randn(16384, 32, requires_grad=True)
    weight = (0.02 * torch.randn(500, 32)).requires_grad_()
    targets = torch.randint(0, 500, (16384,))
    grads = []
    for dtype in (torch.float32, torch.float16):
        x.grad = weight.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.float16):
            loss = head_cross_entropy(x, weight, targets)
        (loss * 65536.0).backward()  # the scaler's initial scale
        grads.append((x.grad.clone(), weight.grad.clone()))
    for exact, half in zip(*grads):
        assert torch.isfinite(half).all()
        assert ((half - exact).norm() / exact.norm()).item() < 0.005  # divided first: 2 % and 7 %


def test_loss_ignores_minus_100_targets():
    """Targets == -100 are left out of the mean cross-entropy (prompt/padding masking)."""
    model = tiny_model().eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (3, 16))
    targets = torch.randint(0, 64, (3, 16))
    targets[0, :5] = -100
    targets[2, 10:] = -100
    targets[1, 7] = -100
    with torch.no_grad():
        logits, _ = model(idx)
        _, loss = model(idx, targets)
    keep = targets != -100
    log_probs = logits.log_softmax(dim=-1)[keep]  # (n_kept, V)
    by_hand = -log_probs.gather(1, targets[keep][:, None]).mean()
    assert torch.allclose(loss, by_hand, atol=1e-6)
    # The masked positions really would have changed the result.
    with torch.no_grad():
        _, loss_all = model(idx, torch.where(keep, targets, 0))
    assert not torch.allclose(loss, loss_all, atol=1e-4)


def _param_formula(V, T, L, C, bias, gpt2):
    """GPT-2's block: a position table, LayerNorms with a scale and (with bias) a shift. The
    default block: no position table (RoPE), RMSNorms with a scale only (QK-norm has no weights)."""
    linear_biases = 13 * C - 4 * C if bias else 0  # c_attn 3C, attn c_proj C, c_fc 4C, mlp c_proj C
    norm = 2 * C if gpt2 and bias else C  # per norm
    positions = T * C if gpt2 else 0
    return V * C + positions + L * (12 * C * C + linear_biases + 2 * norm) + norm


@pytest.mark.parametrize("gpt2", [True, False], ids=["gpt2-block", "default-block"])
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_matches_formula(bias, gpt2):
    """num_params counts the tied embedding/head once and matches the closed-form count."""
    cfg = dict(vocab_size=70, block_size=24, n_layer=3, n_head=4, n_embd=48, bias=bias, **(GPT2_BLOCK if gpt2 else {}))
    model = GPT(GPTConfig(**cfg))
    expected = _param_formula(70, 24, 3, 48, bias, gpt2)
    assert model.num_params() == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def test_head_is_tied_to_token_embedding():
    """lm_head and wte share one tensor, so training one trains the other."""
    model = tiny_model()
    assert model.lm_head.weight is model.wte.weight


def test_forward_rejects_sequence_longer_than_block_size():
    """forward raises ValueError past block_size rather than indexing past the position table."""
    model = tiny_model().eval()
    model(torch.zeros(1, 16, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "bad",
    [
        dict(vocab_size=0),
        dict(block_size=-1),
        dict(n_layer=0),
        dict(n_head=0),
        dict(n_embd=0),
        dict(n_embd=30, n_head=4),
    ],
)
def test_config_rejects_bad_sizes(bad):
    """GPTConfig raises ValueError for non-positive sizes and n_embd % n_head != 0."""
    with pytest.raises(ValueError):
        GPTConfig(**{**TINY, **bad})


def test_dropout_model_is_deterministic_in_eval_mode():
    """Dropout is off in eval mode (two forwards agree) and on in train mode."""
    model = tiny_model(dropout=0.5)
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 16))
    model.eval()
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(idx)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, _ = model(idx)
    assert not torch.allclose(a, c, atol=1e-4)


# -----------------------------------------------------------------------------
# sample_next


def _logits(seed=0, B=4, V=50):
    torch.manual_seed(seed)
    return torch.randn(B, V) * 2


def test_sample_next_temperature_zero_is_argmax():
    """temperature 0 is greedy decoding."""
    logits = _logits()
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_sample_next_draws_follow_tempered_softmax():
    """Draws follow softmax(logits / temperature): frequencies match, cold is greedy, hot spreads."""
    row = _logits(B=1, V=20)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_next(row.expand(n, -1), temperature=2.0, generator=gen)
    freq = torch.bincount(draws, minlength=20).float() / n
    assert torch.allclose(freq, (row[0] / 2.0).softmax(-1), atol=0.02)
    cold = sample_next(row.expand(500, -1), temperature=1e-3, generator=gen)
    assert (cold == row.argmax(-1)).all()
    hot = sample_next(row.expand(2000, -1), temperature=1e3, generator=gen)
    assert len(set(hot.tolist())) == 20


def test_draw_never_picks_an_id_of_probability_zero():
    """Inverse-CDF sampling (model.draw): a masked-out id, first, inside or last, is never drawn,
    and a row with one id left always draws it."""
    from model import draw

    gen = torch.Generator().manual_seed(0)
    probs = _logits(B=1, V=12).softmax(-1).expand(4000, -1).clone()
    banned = [0, 5, 6, 11]
    probs[:, banned] = 0
    draws = draw(probs / probs.sum(-1, keepdim=True), gen)
    assert set(draws.tolist()) == set(range(12)) - set(banned)
    for only in (0, 7, 11):
        one_hot = torch.zeros(50, 12)
        one_hot[:, only] = 1
        assert (draw(one_hot, gen) == only).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0, 100.0])
def test_sample_next_top_k_1_is_argmax(temperature):
    """top_k=1 leaves only the most likely id, whatever the temperature."""
    logits = _logits()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, temperature, top_k=1, generator=gen), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sample_next_tiny_top_p_is_argmax(temperature):
    """A tiny top_p keeps only the most likely id (the first always stays)."""
    logits = _logits()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next(logits, temperature, top_p=1e-6, generator=gen), logits.argmax(-1))


def test_sample_next_top_k_stays_within_k_largest():
    """With top_k=k, many draws hit exactly the k largest logits and nothing else."""
    k, n = 5, 3000
    row = _logits(B=1, V=50)
    allowed = set(torch.topk(row[0], k).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(row.expand(n, -1), temperature=1.0, top_k=k, generator=gen)
    assert set(draws.tolist()) == allowed


def test_sample_next_top_p_stays_within_nucleus():
    """With top_p=p, draws stay within the smallest set of ids whose probability reaches p."""
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # ids 0..5 get a shuffled order of probabilities
    logits = probs[perm].log()[None]
    # Nucleus for p = 0.8 by hand: 0.4 + 0.3 = 0.7 < 0.8, + 0.15 = 0.85 >= 0.8 -> 3 ids.
    nucleus = {i for i in range(6) if perm[i].item() in (0, 1, 2)}
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(3000, -1), temperature=1.0, top_p=0.8, generator=gen)
    assert set(draws.tolist()) == nucleus

    # And on random logits: a subset of the nucleus computed by hand.
    row = _logits(seed=3, B=1, V=50)
    p = 0.6
    sorted_probs, order = row[0].softmax(-1).sort(descending=True)
    n_keep = int((sorted_probs.cumsum(0) < p).sum().item()) + 1
    allowed = set(order[:n_keep].tolist())
    draws = sample_next(row.expand(3000, -1), temperature=1.0, top_p=p, generator=gen)
    assert set(draws.tolist()) <= allowed
    assert len(set(draws.tolist())) > 1


def test_sample_next_same_seeded_generator_same_samples():
    """Sampling draws from the given generator only: same seed, same ids."""
    logits = _logits(B=200)
    a = sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    torch.rand(10)  # disturbing the global RNG must not matter
    b = sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = sample_next(logits, 1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# -----------------------------------------------------------------------------
# generation


def test_greedy_cache_equals_full_recompute_past_block_size():
    """The KV cache path gives the same greedy tokens as recomputing, also after cropping."""
    model = peaky_model()
    n = 3 * model.config.block_size
    cached = greedy_alone(model, [1, 2, 3], n, use_cache=True)
    full = greedy_alone(model, [1, 2, 3], n, use_cache=False)
    assert len(cached) == n
    assert len(set(cached)) > 3  # not a degenerate constant stream
    assert cached == full


def test_sampled_cache_equals_full_recompute_with_same_generator():
    """At temperature 1, cache and recompute draw the same ids from equally seeded generators."""
    model = peaky_model()
    n = 3 * model.config.block_size
    kw = dict(temperature=1.0, top_k=10)
    a = model.generate([[5, 6]], n, use_cache=True, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate([[5, 6]], n, use_cache=False, generator=torch.Generator().manual_seed(3), **kw)
    assert len(set(a[0])) > 3
    assert a == b


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_left_padded_generation_matches_each_prompt_alone(use_cache):
    """Prompts of different lengths in one batch each get exactly what they get alone."""
    model = peaky_model()
    torch.manual_seed(1)
    # lengths 1, 6, 20 (the last already longer than block_size 16)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (1, 6, 20)]
    n = 2 * model.config.block_size + 5
    batched = model.generate(prompts, n, temperature=0, use_cache=use_cache)
    alone = [greedy_alone(model, p, n, use_cache=use_cache) for p in prompts]
    assert all(len(set(a)) > 3 for a in alone)
    assert batched == alone


def _first_new_token_index(seq, start):
    return next(i for i in range(start, len(seq)) if seq[i] not in seq[:i])


def test_stop_ids_end_a_row_while_others_continue():
    """A stop id ends its row (-1 afterwards, last in generate's list); other rows go on."""
    model = peaky_model()
    n = 20
    a = [1, 2, 3]
    greedy_a = greedy_alone(model, a, n)
    k = _first_new_token_index(greedy_a, 2)  # stop at a token not produced before step k
    stop = greedy_a[k]

    # Alone: the stream ends right after the stop id.
    steps = list(model.generate_stream([a], n, temperature=0, stop_ids=[stop]))
    assert len(steps) == k + 1
    assert model.generate([a], n, temperature=0, stop_ids=[stop]) == [greedy_a[: k + 1]]

    # Batched with a prompt whose greedy continuation never produces the stop id.
    b = next(
        p for p in ([i, i + 1] for i in range(0, 60, 3)) if stop not in greedy_alone(model, p, n)
    )
    greedy_b = greedy_alone(model, b, n)
    steps = torch.stack(list(model.generate_stream([a, b], n, temperature=0, stop_ids=[stop])))
    assert steps.shape == (n, 2)
    assert steps[: k + 1, 0].tolist() == greedy_a[: k + 1]
    assert (steps[k + 1 :, 0] == -1).all()
    assert steps[:, 1].tolist() == greedy_b
    assert model.generate([a, b], n, temperature=0, stop_ids=[stop]) == [greedy_a[: k + 1], greedy_b]


@pytest.mark.parametrize("use_cache", [True, False])
def test_dropping_finished_rows_draws_what_keeping_them_draws(use_cache):
    """drop_finished leaves stopped rows out of the batch (and the cache) once a quarter of the
    running rows have stopped; every row still gets the ids it gets when all rows run to the
    end, sampled with the same seeded generator, with left padding and past the block."""
    model = peaky_model(seed=2)
    torch.manual_seed(4)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (1, 3, 5, 2, 7, 4, 6, 2)]
    n = 2 * model.config.block_size
    kw = dict(temperature=1.0, top_k=20, stop_ids=[7], use_cache=use_cache)  # id 7: rows stop at many steps
    runs = {drop: torch.stack(list(model.generate_stream(prompts, n, generator=torch.Generator().manual_seed(6),
                                                          drop_finished=drop, **kw)))
            for drop in (True, False)}
    steps = runs[True]
    lengths = [int((steps[:, row] >= 0).sum()) for row in range(len(prompts))]
    assert len(set(lengths)) > 2 and min(lengths) < n // 4 < max(lengths)  # rows stopped at many steps
    assert torch.equal(steps, runs[False])


def test_stop_at_first_token():
    """A stop id that is the very first greedy token ends the stream after one step."""
    model = peaky_model()
    first = greedy_alone(model, [7, 8, 9], 1)[0]
    steps = list(model.generate_stream([[7, 8, 9]], 10, temperature=0, stop_ids={first}))
    assert len(steps) == 1 and steps[0].tolist() == [first]


@pytest.mark.parametrize("prompts", [[], [[]], [[1, 2], []]])
def test_generate_rejects_empty_prompts(prompts):
    """generate raises ValueError for no prompts or an empty prompt."""
    model = tiny_model()
    with pytest.raises(ValueError):
        model.generate(prompts, 5)


def test_generate_stream_restores_training_mode_and_samples_in_eval():
    """Generation runs in eval mode (no dropout) and leaves train/eval mode as it found it."""
    model = tiny_model(dropout=0.5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    model.eval()
    expected = model.generate([[1, 2]], 20, temperature=0)
    assert not model.training

    model.train()
    got = model.generate([[1, 2]], 20, temperature=0)
    assert model.training
    assert all(m.training for m in model.modules())
    assert got == expected  # dropout was off while generating

    # A stream closed early also restores the mode.
    stream = model.generate_stream([[1, 2]], 20, temperature=0)
    next(stream)
    stream.close()
    assert model.training


def test_last_only_gives_the_last_positions_logits():
    model = tiny_model().eval()
    idx = torch.randint(0, TINY["vocab_size"], (3, 10))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, full[:, -1:, :])


def test_score_at_gives_those_positions_logits_and_their_gradients():
    """Losses that read some positions only (losses.labelled_logps) ask the head for those alone."""
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (3, 10))
    at = torch.tensor([2, 3, 9, 14, 25, 29])  # row by row: (0, 2), (0, 3), (0, 9), (1, 4), (2, 5), (2, 9)
    full, _ = model(idx)
    some, _ = model(idx, score_at=at)
    assert some.shape == (6, TINY["vocab_size"])
    torch.testing.assert_close(some, full.flatten(0, 1)[at])
    grads = []
    for logits in (full.flatten(0, 1)[at], some):
        model.zero_grad(set_to_none=True)
        torch.log_softmax(logits, dim=-1)[:, 0].sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_a_compiled_decoding_step_generates_what_the_eager_one_does():
    """GPT.generate's compile: the one-token step at fixed shapes (all block_size slots of the
    cache, masked) gives the eager step's greedy output, with left padding, and past the
    block, where both crop the context and recompute."""
    model = peaky_model(seed=3)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    steps = model.config.block_size  # the longest prompt runs past the block
    eager = model.generate(prompts, steps, temperature=0)
    assert model.generate(prompts, steps, temperature=0, compile=True) == eager
    assert model.generate(prompts[1:2], 12, temperature=0, compile=True) == model.generate(prompts[1:2], 12,
                                                                                            temperature=0)


def test_one_row_products_become_loops_and_batches_keep_their_product():
    """model.one_row_products_as_loops, the compiled step's Inductor pass: an fp32 product of one
    row by a matrix, with or without a bias (nn.Linear at one token), becomes a multiply-and-sum
    that computes the same values; a product of several rows, or in bf16, stays a product."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from model import one_row_products_as_loops

    def linears(one, rows, weight, bias):
        half = one.to(torch.bfloat16), weight.to(torch.bfloat16)
        return torch.addmm(bias, one, weight), torch.mm(one, weight), torch.addmm(bias, rows, weight), torch.mm(*half)

    torch.manual_seed(0)
    args = (torch.randn(1, 8), torch.randn(3, 8), torch.randn(8, 5), torch.randn(5))
    traced = make_fx(linears, tracing_mode="fake")(*args)
    one_row_products_as_loops(traced.graph)
    traced.recompile()
    aten = torch.ops.aten
    kept = [n.args[-2].meta["val"] for n in traced.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]
    assert [(tuple(x.shape), x.dtype) for x in kept] == [((3, 8), torch.float32), ((1, 8), torch.bfloat16)]
    assert sum(n.target is aten.sum.dim_IntList for n in traced.graph.nodes) == 2
    for got, want in zip(traced(*args), linears(*args)):
        torch.testing.assert_close(got, want)


def test_without_a_working_compiler_generation_goes_on_uncompiled(monkeypatch):
    """torch.compile finds a missing C++ compiler only at the decoding step's first call: that
    call fails, a warning says so, and the answers are the eager ones. A failure after a
    compiled step ran is not that, and is raised."""
    import model as model_module

    model = peaky_model(seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    eager = model.generate(prompts, 12, temperature=0)

    def no_compiler(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(model_module.torch, "compile", no_compiler)
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError\); generating without it"):
        assert model.generate(prompts, 12, temperature=0, compile=True) == eager
    # A prompt longer than the block: the first compiled call is the window's, past the block.
    long = [list(range(1, model.config.block_size + 4))]
    with pytest.warns(UserWarning, match=r"torch.compile failed \(RuntimeError\); generating without it"):
        assert model.generate(long, 6, temperature=0, compile=True) == model.generate(long, 6, temperature=0)

    def fails_later(module, **kwargs):
        calls = []

        def step(*args, **kw):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("out of memory")
            return module(*args, **kw)
        return step

    monkeypatch.setattr(model_module.torch, "compile", fails_later)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.generate(prompts, 12, temperature=0, compile=True)


def test_bf16_weights_generate_like_autocast():
    """generation.for_generation casts the weights to bf16: greedy text should barely change."""
    from tanggpt.device import Runtime
    from tanggpt.generation import for_generation

    model = peaky_model(seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.generate(prompts, 6, temperature=0)
    cast = for_generation(model, Runtime(torch.device("cpu"), torch.bfloat16))
    assert next(cast.parameters()).dtype == torch.bfloat16 and not cast.training
    got = cast.generate(prompts, 6, temperature=0)
    agree = sum(a == b for e, g in zip(expected, got) for a, b in zip(e, g))
    assert agree >= 10  # of 12: rounding may flip a near-tie, not the whole output


# -----------------------------------------------------------------------------
# The architecture choices beside GPT-2's (GPTConfig.norm, activation, positions, qk_norm, tie_head)

MODERN = dict(norm="rmsnorm", activation="relu2", positions="rope", qk_norm=True, tie_head=False)
CHOICES = [{**GPT2_BLOCK, name: value} for name, value in MODERN.items()] + [MODERN]


def test_the_default_block_makes_the_modern_choices_with_a_tied_head():
    assert {name: getattr(GPTConfig(), name) for name in MODERN} == {**MODERN, "tie_head": True}


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: "+".join(f"{k}={v}" for k, v in c.items()))
def test_each_choice_keeps_causality_cache_and_padding_exact(choice):
    """Every choice changes the function (other logits than GPT-2's), and keeps what
    generation relies on: causal, the KV cache exact past block_size, left padding invisible."""
    model = tiny_model(**choice).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 64
    with torch.no_grad():
        a, b, gpt2 = model(idx)[0], model(changed)[0], tiny_model(**GPT2_BLOCK).eval()(idx)[0]
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6) and not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-4)
    assert a.shape == gpt2.shape and not torch.allclose(a, gpt2, atol=1e-3)
    with torch.no_grad():
        for p in model.parameters():  # large weights, so greedy choices are not near-ties
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    cached = model.generate(prompts, 20, temperature=0)  # crosses block_size 16
    assert cached == model.generate(prompts, 20, temperature=0, use_cache=False)
    assert cached == [greedy_alone(model, p, 20) for p in prompts]


def test_rope_has_no_position_table_and_an_untied_head_its_own_matrix():
    model = tiny_model(**{**GPT2_BLOCK, "positions": "rope", "tie_head": False})
    assert not hasattr(model, "wpe")
    assert model.lm_head.weight is not model.wte.weight
    # Without the position table, with a second vocab x n_embd matrix.
    gpt2 = tiny_model(**GPT2_BLOCK)
    assert model.num_params() == gpt2.num_params() - 16 * 32 + 64 * 32


@pytest.mark.parametrize("bad", [dict(norm="batchnorm"), dict(activation="tanh"), dict(positions="alibi"),
                                 dict(positions="rope", n_embd=30, n_head=2)])
def test_config_rejects_unknown_choices(bad):
    with pytest.raises(ValueError):
        GPTConfig(**{**TINY, **bad})

"""lora.py: the adapted model starts as the base, merges exactly, trains only its adapters."""

from __future__ import annotations

import copy

import pytest
import torch

from lora import (LoRALinear, adapter_layers, adapter_state_dict, adapters_disabled, add_adapters,
                  load_adapter_state_dict, merge_adapters, trainable_parameters)
from model import GPT, GPTConfig


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(seed))


def with_trained_adapters(targets: str = "all", rank: int = 4) -> tuple[GPT, GPT]:
    """(base, adapted copy whose B matrices are random, as after some training)."""
    base = tiny_model()
    adapted = copy.deepcopy(base)
    add_adapters(adapted, rank=rank, alpha=8, targets=targets)
    with torch.no_grad():
        for layer in adapter_layers(adapted).values():
            layer.lora_B.normal_(0, 0.05)
    return base, adapted


@pytest.mark.parametrize("targets, count", [("attention", 4), ("mlp", 4), ("all", 8)])
def test_zero_initialised_b_gives_the_base_models_outputs(targets, count):
    base = tiny_model()
    adapted = copy.deepcopy(base)
    wrapped = add_adapters(adapted, rank=4, alpha=8, targets=targets)
    assert len(wrapped) == count and all(isinstance(adapted.get_submodule(p), LoRALinear) for p in wrapped)
    assert torch.equal(adapted(tokens())[0], base(tokens())[0])


def test_merged_and_unmerged_forwards_agree_and_disabled_is_the_base():
    base, adapted = with_trained_adapters()
    unmerged = adapted(tokens())[0]
    assert (unmerged - base(tokens())[0]).abs().max() > 1e-3  # the adapters do change the function
    with adapters_disabled(adapted):
        assert torch.equal(adapted(tokens())[0], base(tokens())[0])
    assert torch.equal(adapted(tokens())[0], unmerged)  # switched back on after the block
    merged = merge_adapters(copy.deepcopy(adapted))
    assert not adapter_layers(merged)
    assert set(merged.state_dict()) == set(base.state_dict())  # an ordinary model again
    torch.testing.assert_close(merged(tokens())[0], unmerged, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_scaled_b_times_a():
    _, adapted = with_trained_adapters(rank=4)
    layer = adapted.blocks[0].attn.c_attn
    assert torch.allclose(layer.delta_weight(), layer.lora_B @ layer.lora_A * (8 / 4))
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 4


def test_after_a_step_only_adapter_parameters_changed():
    base = tiny_model()
    model = copy.deepcopy(base).train()
    add_adapters(model, rank=2, alpha=4, targets="all")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    for _ in range(2):  # the first step moves only B (A's gradient is B-weighted, and B is zero)
        _, loss = model(tokens(), tokens(2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, t in model.state_dict().items() if not torch.equal(t, before[n])}
    assert changed == set(adapter_state_dict(model))  # every A and B, nothing else
    for name, tensor in base.state_dict().items():  # the wrapped weights sit under .base, untouched
        key = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(model.state_dict().get(key, model.state_dict().get(name)), tensor)


def test_trainable_share_and_adapter_state_are_small():
    _, adapted = with_trained_adapters(rank=4)
    trainable, total = trainable_parameters(adapted)
    # per block: c_attn 4·(32+96), attn c_proj 4·(32+32), c_fc 4·(32+128), mlp c_proj 4·(128+32)
    assert trainable == 2 * 4 * (128 + 64 + 160 + 160)
    assert total == trainable + tiny_model().num_params()
    state = adapter_state_dict(adapted)
    assert sum(t.numel() for t in state.values()) == trainable
    fresh = copy.deepcopy(tiny_model())
    add_adapters(fresh, rank=4, alpha=8)
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

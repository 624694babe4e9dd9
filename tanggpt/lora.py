"""LoRA (Hu et al. 2021): tune a frozen model through low-rank adapters.

A linear layer computes y = x Wᵀ (+ b). Tuning it in full learns a new W, out × in numbers.
LoRA keeps W frozen and learns the change as a product of two thin matrices,

    y = x Wᵀ + (alpha / r) · dropout(x) Aᵀ Bᵀ,      A: r × in,  B: out × r,

so the update ΔW = (alpha / r) · B A has rank at most r and costs r · (in + out) numbers
instead of in · out. B starts at zero, so the adapted model starts exactly equal to the
base; A starts random, so the first step's gradient on B is not zero. alpha / r keeps the
update's scale the same when r changes: the same learning rate suits every rank.

`add_adapters` wraps the chosen linear layers of a model (attention, MLP, or both) and
freezes everything else: embeddings, norms, the output head, except, when asked, the rows
of a few tokens the base never learned (TokenRows: the instruction markers and
<|endoftext|>, which pretraining never showed). `merge_adapters` folds each
B A into its W and puts plain linear layers back: the merged model is an ordinary one, as
fast as the base. `adapters_disabled` switches the adapters off for a forward pass: the
base model, without a second copy of its weights (the reference model of preference tuning).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# Which linear layers --lora-targets names, by their attribute path inside a transformer block.
TARGETS = {
    "attention": ("attn.c_attn", "attn.c_proj"),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
    "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (alpha / rank) · B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        # A as nn.Linear's own init would draw it (kaiming-uniform); B zero: B A = 0 at the start.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        # x Aᵀ first: two thin matmuls (r columns) instead of forming the full out × in B A.
        return y + (self.dropout(x) @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) · B A, the update the adapter adds to the frozen weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain linear layer with W + ΔW: the same function, without the adapter."""
        merged = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                           device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.base.weight + self.delta_weight().to(self.base.weight.dtype))
            if self.base.bias is not None:
                merged.bias.copy_(self.base.bias)
        return merged


class TokenRows(nn.Module):
    """The frozen token embedding with the rows of a few tokens trainable.

    Pretraining never feeds the instruction markers in, nor asks for <|endoftext|>: their
    rows were only ever pushed down, as wrong answers for every position. Frozen, they are
    words the adapters must work around, and the one that ends an answer is the hardest to
    reach (LoRA on the linear layers alone learned to stop in a quarter of its answers;
    docs/lora.md). So these rows train too: as a change added to the base rows, zero at
    the start like B, which weight decay pulls back toward the base, not toward zero.
    k rows cost k x n_embd numbers.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.base = embedding
        self.base.requires_grad_(False)
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long,
                                                       device=embedding.weight.device), persistent=False)
        self.row_delta = nn.Parameter(torch.zeros(len(token_ids), embedding.embedding_dim,
                                                  device=embedding.weight.device))
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        """The embedding matrix in use: the base's, with the trained rows' change added."""
        if not self.enabled:
            return self.base.weight
        return self.base.weight.index_add(0, self.token_ids, self.row_delta.to(self.base.weight.dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)

    def merged(self) -> nn.Embedding:
        """A plain embedding holding the trained rows: the same function, without the change kept apart."""
        merged = nn.Embedding(self.base.num_embeddings, self.base.embedding_dim,
                              device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(self.weight)
        return merged


class TiedHead(nn.Module):
    """The output head of a model whose embedding is TokenRows: scores against the same rows.

    GPT ties lm_head's weight to the embedding's; with some rows trained the head must read
    the embedding's current matrix, or <|endoftext|> would be learned as input but never as
    an answer.
    """

    def __init__(self, rows: TokenRows):
        super().__init__()
        # Not a registered submodule: it is the model's wte, and registering it here too
        # would list its weights twice in the model's state_dict.
        object.__setattr__(self, "rows", rows)

    @property
    def weight(self) -> torch.Tensor:
        """The matrix the head scores against (GPT.forward's loss reads it, as it reads nn.Linear's)."""
        return self.rows.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def _parent_and_name(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return model.get_submodule(parent_path), name


def add_adapters(model: nn.Module, rank: int, alpha: float, targets: str = "all", dropout: float = 0.0,
                 token_ids: Sequence[int] = ()) -> list[str]:
    """Freeze `model` and wrap its target linear layers in LoRALinear; return their paths.

    Only the adapters' A and B are left trainable, and the rows of `token_ids` in the tied
    embedding and head (TokenRows), so only they reach the optimizer
    (training.configure_optimizer skips frozen parameters).
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if token_ids and model.lm_head.weight is not model.wte.weight:
        # TiedHead reads the embedding's rows: right only where the head is the embedding.
        raise ValueError("training token rows needs a model whose head is tied to its embedding "
                         "(--lora-tokens none for an untied one)")
    model.requires_grad_(False)
    wrapped = []
    for index, _ in enumerate(model.blocks):
        for suffix in TARGETS[targets]:
            path = f"blocks.{index}.{suffix}"
            parent, name = _parent_and_name(model, path)
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
            wrapped.append(path)
    if token_ids:
        model.wte = TokenRows(model.wte, token_ids)
        model.lm_head = TiedHead(model.wte)
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear layers by path (empty for a model without adapters)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters' weights (A and B of each layer, the trained token rows' change): what
    an adapter checkpoint stores."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if name.endswith((".lora_A", ".lora_B", ".row_delta"))}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights into a model that has the same adapters (add_adapters first)."""
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"adapter weights do not match the model's adapters (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]})")
    model.load_state_dict(state, strict=False)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer (W + (alpha / r) B A) and put plain linear layers back. In place."""
    for path, layer in adapter_layers(model).items():
        parent, name = _parent_and_name(model, path)
        setattr(parent, name, layer.merged())
    if isinstance(model.wte, TokenRows):
        model.wte = model.wte.merged()
        model.lm_head = nn.Linear(model.wte.embedding_dim, model.wte.num_embeddings, bias=False,
                                  device=model.wte.weight.device, dtype=model.wte.weight.dtype)
        model.lm_head.weight = model.wte.weight  # tied again, as GPT builds it
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model computes as its frozen base: every adapter (and trained token row) switched off."""
    layers = [*adapter_layers(model).values(), *(m for m in model.modules() if isinstance(m, TokenRows))]
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

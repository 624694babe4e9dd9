"""A decoder-only transformer in the GPT-2 mould, from scratch.

    token + position embeddings -> n_layer x [LayerNorm -> causal self-attention -> +,
                                              LayerNorm -> MLP -> +] -> LayerNorm -> head

The head shares its weights with the token embedding (weight tying), as in GPT-2.
`forward` trains; `generate` / `generate_stream` sample with a KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 9274  # set from the tokenizer; 9,274 is the char vocabulary of the Tang corpus
    block_size: int = 128  # longest context the model can see (learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # The choices below default to GPT-2's; each alternative is what recent small-model
    # recipes (nanochat, modded-nanogpt, Llama) use instead.
    norm: str = "layernorm"  # or "rmsnorm": scale only, no mean subtracted, no bias
    activation: str = "gelu"  # or "relu2": ReLU squared, max(0, x)^2
    positions: str = "learned"  # or "rope": rotate queries and keys by their position
    qk_norm: bool = False  # RMS-normalise queries and keys before attention
    tie_head: bool = True  # the head shares the token embedding's weights

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("activation", ("gelu", "relu2")),
                              ("positions", ("learned", "rope"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"positions 'rope' needs an even head size, got {self.n_embd // self.n_head}")


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoPE): turn each pair of a head's channels by an angle
    proportional to the position. The dot product of a query and a key then depends on
    how far apart they are, not on where they are."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Without a cache, each new token re-runs the whole context through the model. With
    one, each step computes keys and values for the new position only and attends to
    the stored ones, so a step costs O(context) instead of O(context^2).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        head_dim = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored; advanced by GPT.forward after all layers ran

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_head, T, head_dim) keys/values; return all stored so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer  # which slot of a KVCache is ours
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # bounded attention logits, whatever the weights grow to
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotation is not None:
            q, k = rotate(q, *rotation), rotate(k, *rotation)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Training: a plain causal mask, which lets PyTorch pick its fastest kernel
            # (flash attention on CUDA). Position t sees positions 0..t only.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # Generation: an explicit mask that also hides left padding and handles a
            # query block that starts after the cached positions.
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.activation == "relu2"
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm: normalise the input of each sublayer, add its output to the residual stream."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
        rotation: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, rotation)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        else:  # RoPE: fixed angles, position t turns channel pair i by t / 10000^(2i / head_dim)
            head_dim = config.n_embd // config.n_head
            inverse_frequency = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
            angles = torch.outer(torch.arange(config.block_size).float(), inverse_frequency)
            self.register_buffer("rope_cos", angles.cos(), persistent=False)
            self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            # Weight tying: the same matrix maps ids to vectors and vectors back to id scores.
            # It saves vocab_size x n_embd parameters, a large share of a small model.
            self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2: each residual branch's output projection is scaled down by sqrt(2 * n_layer),
        # because n_layer blocks each add two branches to the residual stream, whose
        # variance would otherwise grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size) and, given targets, the loss.

        The loss is the mean cross-entropy over target positions that are not -100 (the
        label the fine-tuning stage uses for prompt and padding tokens). positions,
        attn_mask, kv_cache and last_only (logits of the last position only) are for
        generation; training leaves them unset.
        """
        B, T = idx.shape
        if positions is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)
        x = self.wte(idx)
        rotation = None
        if self.config.positions == "learned":
            x = x + self.wpe(positions)
        else:  # (T, head_dim/2) or (B, T, head_dim/2) angles; unsqueezed to broadcast over heads
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            rotation = (cos.unsqueeze(-3), sin.unsqueeze(-3)) if cos.dim() == 3 else (cos, sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, attn_mask, kv_cache, rotation)
        if kv_cache is not None:
            kv_cache.length += T
        x = self.ln_f(x)
        if last_only:
            # Sampling needs only the next token's scores, and the head (n_embd x vocab_size)
            # is the largest matmul of a small model: skip it for the other positions.
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            # float(): under bf16 autocast, take the softmax in fp32 for an accurate loss.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # -------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate_stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_ids: Iterable[int] = (),
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        allowed: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Sample continuations of a batch of prompts, yielding a (B,) tensor of new ids per step.

        Prompts may differ in length: they are left-padded, and the padding is hidden
        from attention and skipped by the positions, so each row gets exactly what it
        would get alone. A row that produced a stop id yields -1 from then on; the stream
        ends when every row has stopped or after max_new_tokens steps. temperature 0
        is greedy decoding.

        allowed, if given, is a constraint from the caller: given the (B, t) ids generated so
        far it returns a (B, vocab) mask of the ids each row may take next (at least one
        per row), or None for no constraint at this step.

        With use_cache, the prompt is run once and each step feeds one new token. When
        the context outgrows block_size, both modes crop it to the last block_size
        tokens and recompute (the cache cannot slide, since positions are absolute).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        device = self.wte.weight.device
        block_size = self.config.block_size
        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        width = max(len(p) for p in prompts)
        pad = torch.tensor([width - len(p) for p in prompts], device=device)
        # One buffer for prompt and answer, filled column by column (no re-allocation per step).
        seq = torch.zeros(len(prompts), width + max_new_tokens, dtype=torch.long, device=device)
        for row, p in enumerate(prompts):
            seq[row, width - len(p) : width] = torch.tensor(p, dtype=torch.long, device=device)
        # For a one-token step with the cache, the new query may see every real key: the
        # mask is just "not padding", made once here instead of once per step.
        key_is_real = (torch.arange(seq.size(1), device=device)[None, :] >= pad[:, None])[:, None, None, :]
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.wte.weight.dtype
        kv_cache = KVCache(self.config, len(prompts), device, dtype) if use_cache else None

        was_training = self.training
        self.eval()
        try:
            for step in range(max_new_tokens):
                end = width + step
                if kv_cache is not None and kv_cache.length > 0 and end <= block_size:
                    start = end - 1  # feed only the newest token; the cache holds the rest
                    positions, mask = (start - pad)[:, None], key_is_real[..., :end]
                else:
                    if end > block_size:
                        kv_cache = None  # the cache cannot slide (positions are absolute)
                    start = max(0, end - block_size)  # the whole context, cropped to block_size
                    positions, mask = _window(start, end, pad)
                logits, _ = self(seq[:, start:end], positions=positions, attn_mask=mask, kv_cache=kv_cache,
                                 last_only=True)
                scores = logits[:, -1, :].float()
                mask = allowed(seq[:, width:end]) if allowed is not None else None
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                next_ids = sample_next(scores, temperature, top_k, top_p, generator)
                next_ids = torch.where(finished, torch.full_like(next_ids, -1), next_ids)
                yield next_ids
                finished |= torch.isin(next_ids, stop)
                if finished.all():
                    return
                # Stopped rows keep running (batched compute) on a harmless token.
                seq[:, end] = next_ids.clamp(min=0)
        finally:
            self.train(was_training)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
        """generate_stream collected into one list of new ids per prompt (a stop id, if hit, is last)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.generate_stream(prompts, max_new_tokens, **kwargs):
            for row, token in enumerate(step.tolist()):
                if token >= 0:
                    out[row].append(token)
        return out


def _window(start: int, end: int, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions and attention mask for the columns [start, end) of the left-padded sequence.

    Row b's real tokens begin at column pad[b] (or at start, if the window was cropped
    past its beginning), which is position 0. With no padding in the window, the mask
    is None: plain causal attention, and the fastest kernel.
    """
    cols = torch.arange(start, end, device=pad.device)
    first_real = pad.clamp(min=start)
    positions = (cols[None, :] - first_real[:, None]).clamp(min=0)  # (B, T)
    if start >= int(pad.max()):
        return positions, None
    causal = cols[None, None, :] <= cols[None, :, None]
    real = cols[None, None, :] >= pad[:, None, None]
    # A padding query would see no key at all (a NaN softmax); let it see itself. Its
    # output is never used.
    itself = cols[None, None, :] == cols[None, :, None]
    mask = (causal & real) | itself  # (B, T, T)
    return positions, mask[:, None]  # broadcast over heads


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one id per row from (B, vocab) logits.

    temperature scales confidence (0 = always the most likely id); top_k keeps the k most
    likely ids; top_p keeps the smallest set of ids whose probability adds up to p.
    """
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1, 0 < top_p <= 1; got {temperature}, {top_k}, {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop an id when the ids before it already reach top_p; the first always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

"""A decoder-only transformer in the GPT-2 mould, from scratch.

    token embeddings -> n_layer x [RMSNorm -> causal self-attention (RoPE, QK-norm) -> +,
                                   RMSNorm -> MLP (ReLU²) -> +] -> RMSNorm -> head

GPT-2's layout (pre-norm blocks, residual stream, weight tying: the head shares its
weights with the token embedding) with four of its parts replaced by what recent
small-model recipes use, each a GPTConfig choice; GPT2_BLOCK puts GPT-2's back (learned
position embeddings, LayerNorm, GELU). `forward` trains; `generate` / `generate_stream`
sample with a KV cache.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 9274  # set from the tokenizer; 9,274 is the char vocabulary of the Tang corpus
    block_size: int = 128  # longest context the model can see
    # Narrow and deep: with 9,274 ids the output layer costs vocab_size x n_embd per token
    # whatever the depth, so on a CPU budget a narrower model sees more tokens (docs/speed.md).
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    # The block's choices. The defaults are what recent small-model recipes (nanochat,
    # modded-nanogpt, Llama) use instead of GPT-2's, each kept because it won at equal
    # training time on a laptop CPU (docs/speed.md); GPT2_BLOCK below gives GPT-2's.
    norm: str = "rmsnorm"  # GPT-2: "layernorm". RMSNorm scales only: no mean subtracted, no bias
    activation: str = "relu2"  # GPT-2: "gelu". ReLU squared, max(0, x)^2
    positions: str = "rope"  # GPT-2: "learned". RoPE rotates queries and keys by their position
    qk_norm: bool = True  # GPT-2: False. RMS-normalise queries and keys before attention
    tie_head: bool = True  # the head shares the token embedding's weights, as in GPT-2

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


# GPT-2's block: GPTConfig(**GPT2_BLOCK) is GPT-2 in all but size. A checkpoint written
# before the choices existed holds a model of this block (checkpoint.py fills them in).
GPT2_BLOCK = dict(norm="layernorm", activation="gelu", positions="learned", qk_norm=False, tie_head=True)


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


class _HeadCrossEntropy(torch.autograd.Function):
    """The output layer and its cross-entropy in one pass, a chunk of positions at a time.

    Written plainly, logits = x Wᵀ is a (positions x vocab_size) matrix, 9,274 scores per
    position with the char tokenizer: at batch 16 x 128 positions that is 76 MB of fp32,
    which the softmax, the loss and their backward read and write several times. On a CPU
    that memory traffic costs as much as the matmul itself. Here each chunk of positions
    is scored, turned into its loss and, because the loss is the last thing computed, into
    its gradients (softmax - one_hot) right away, while the chunk's scores are still in the
    cache; backward only scales them by the incoming gradient. The FLOPs are the same as
    the plain way; the full logits never exist.

    The gradients kept are those of the *sum* of the losses; backward divides by the count.
    Per position they are O(1), where the mean's would be thousands of times smaller: under
    fp16 autocast, whose smallest normal number is 6e-5, those would round away in the
    matmuls below before the gradient scaler could lift them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                need_x_grad: bool, need_weight_grad: bool) -> torch.Tensor:
        count = max(x.size(0), 1)  # every row is labelled: head_cross_entropy passes those alone
        x_grad = torch.zeros_like(x) if need_x_grad else None
        weight_grad = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight_grad else None
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        for start in range(0, x.size(0), chunk_size):
            xc, tc = x[start:start + chunk_size], targets[start:start + chunk_size]
            rows = torch.arange(tc.numel(), device=tc.device)
            scores = (xc @ weight.t()).float()  # float(): the softmax in fp32, also under bf16 autocast
            target_score = scores[rows, tc]
            top = scores.amax(dim=1, keepdim=True)  # subtract the max so exp cannot overflow
            probs = scores.sub_(top).exp_()  # in place: the chunk's scores are not needed again
            sums = probs.sum(dim=1, keepdim=True)
            total += (top.squeeze(1) + sums.log().squeeze(1) - target_score).sum()
            if x_grad is None and weight_grad is None:
                continue
            # d(summed loss)/d(scores) = softmax - one_hot
            probs.mul_(1 / sums)
            probs[rows, tc] -= 1
            probs = probs.to(xc.dtype)
            if x_grad is not None:
                x_grad[start:start + chunk_size] = probs @ weight.to(probs.dtype)
            if weight_grad is not None:
                weight_grad += (probs.t() @ xc).float()
        ctx.save_for_backward(x_grad, weight_grad)
        ctx.weight_dtype, ctx.count = weight.dtype, count
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        x_grad, weight_grad = ctx.saved_tensors
        grad_sum = grad_loss / ctx.count  # the loss is the mean: each position's share
        return (None if x_grad is None else x_grad * grad_sum,
                None if weight_grad is None else (weight_grad * grad_sum).to(ctx.weight_dtype),
                None, None, None, None)


# How many rows are labelled depends on the data: under torch.compile this runs outside the
# graph (as it would anyway: a data-dependent shape ends a graph), instead of a warning.
@torch.compiler.disable
def _labelled_rows(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of x and targets whose target is not -100 (all of them, untouched, in pretraining)."""
    labelled = targets != -100
    if bool(labelled.all()):  # (on a GPU, this reads one number back: a short wait)
        return x, targets
    # Tuning labels the response alone: the prompt's and the padding's positions need no
    # scores. Score the labelled ones only (autograd gives the others a zero gradient).
    rows = labelled.nonzero().squeeze(1)
    return x[rows], targets[rows]


def head_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_size: int = 512) -> torch.Tensor:
    """Mean cross-entropy of the scores x Wᵀ against targets, skipping targets == -100.

    x: (N, n_embd), weight: (vocab_size, n_embd), targets: (N,). The same number as
    F.cross_entropy(x @ weight.t(), targets, ignore_index=-100), and the same gradients,
    without the (N, vocab_size) scores ever held in memory at once (_HeadCrossEntropy).
    """
    x, targets = _labelled_rows(x, targets)
    grad = torch.is_grad_enabled()
    # Gradients are computed inside forward, where autograd records nothing: ask for them
    # only where backward will want them (not at evaluation, not for a frozen head).
    return _HeadCrossEntropy.apply(x, weight, targets, chunk_size,
                                   grad and x.requires_grad, grad and weight.requires_grad)


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Without a cache, each new token re-runs the whole context through the model. With
    one, each step computes keys and values for the new position only and attends to
    the stored ones, so a step costs O(context) instead of O(context^2).

    It is allocated once, for block_size positions (and copied to fewer rows when generation
    drops the answers that have ended: keep_rows), and written in two ways. The prompt
    is written at `length`, and attends to what is stored so far. A decoding step's one
    new position is written at `slot`, a tensor, and attends to all block_size slots,
    its attention mask hiding those not written yet: the step then has the same shapes
    every time, so it can be compiled once (GPT.generate_stream's `compile`).
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        head_dim = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, head_dim)
        # A tensor per layer, not one with a layer dimension: a compiled step writes into
        # each in place, where it copied the per-layer views of one tensor whole at every
        # step (docs/speed.md, Sampling).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions stored; advanced by GPT.hidden after all layers ran
        self.slot: torch.Tensor | None = None  # (1,): where a decoding step writes, if set

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, n_head, T, head_dim) keys/values; return all stored so far
        (at a slot: all block_size slots, those not written yet included)."""
        keys, values = self.k[layer], self.v[layer]
        if self.slot is not None:
            keys[:, :, self.slot] = k.to(keys.dtype)  # under autocast k may be fp32
            values[:, :, self.slot] = v.to(values.dtype)
            return keys, values
        end = self.length + k.size(2)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep these rows of the batch only, in this order: generation drops the answers that
        have ended, so that each step computes the others alone."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


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
        # q, k and v in one matmul, then (B, T, 3C) -> (B, 3 n_head, T, head_dim): each head
        # attends independently. q's and k's heads stay side by side, so the norm and the
        # rotation below treat both in one call each.
        qkv = self.c_attn(x).view(B, T, 3 * self.n_head, C // self.n_head).transpose(1, 2)
        qk, v = qkv[:, : 2 * self.n_head], qkv[:, 2 * self.n_head :]
        if self.qk_norm:  # bounded attention logits, whatever the weights grow to
            qk = F.rms_norm(qk, (qk.size(-1),))
        if rotation is not None:
            qk = rotate(qk, *rotation)
        q, k = qk.split(self.n_head, dim=1)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            # Training: a plain causal mask, which lets PyTorch pick its fastest kernel
            # (flash attention on CUDA). Position t sees positions 0..t only. One query
            # (generation's step with the cache, no padding) is the newest position: it
            # sees every key, and needs no mask at all.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        elif T == 1 and torch.compiler.is_compiling():
            # The compiled decoding step (GPT.generate_stream's compile): one query against every
            # slot of the cache, the mask hiding those not written yet. Written out, torch.compile
            # fuses the scores, the mask, the softmax and the weighted sum with the operations
            # around them; scaled_dot_product_attention would stay a kernel call of its own per
            # layer, slower than the whole sum at one query (docs/speed.md).
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            y = scores.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1) @ v
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

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Add embedding (and head) rows for new ids after the last one: a tokenizer that gains
        tokens (the chat markers) keeps every old id, so the trained rows stay as they are.
        Each new row starts as the mean of the old ones, not a random vector of the init's
        scale, which trained rows have long left: a new id starts as an average token to the
        blocks and, in the head, scores like one, instead of at an arbitrary level."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"grow_vocab: {vocab_size} is fewer ids than the model's {old}")
        if vocab_size == old:
            return

        def grown(weight: torch.Tensor) -> nn.Parameter:
            new_rows = weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
            return nn.Parameter(torch.cat([weight, new_rows]), requires_grad=weight.requires_grad)

        self.wte.weight = grown(self.wte.weight)
        self.wte.num_embeddings = vocab_size
        self.lm_head.weight = self.wte.weight if self.config.tie_head else grown(self.lm_head.weight)
        self.lm_head.out_features = vocab_size
        self.config = replace(self.config, vocab_size=vocab_size)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
               kv_cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the last block's output after the final norm (B, T, n_embd): what the head scores."""
        T = idx.size(1)
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
        if kv_cache is not None and kv_cache.slot is None:
            kv_cache.length += T
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        score_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits (B, T, vocab_size), None), or given targets (None, loss).

        The loss is the mean cross-entropy over target positions that are not -100 (the
        label the fine-tuning stage uses for prompt and padding tokens); with targets the
        logits are not returned, because the loss is computed without them. score_at, indices
        into the B * T positions taken row by row, asks for those positions' logits alone,
        (len(score_at), vocab_size). positions, attn_mask, kv_cache and last_only (logits of
        the last position only) are for generation; training leaves them unset.
        """
        x = self.hidden(idx, positions, attn_mask, kv_cache)
        if last_only:
            # Sampling needs only the next token's scores, and the head (n_embd x vocab_size)
            # is the largest matmul of a small model: skip it for the other positions.
            x = x[:, -1:, :]
        if score_at is not None:
            # The same for a loss that reads some positions only (an answer's tokens, not its
            # prompt or padding). index_select, not a boolean mask: its backward (index_add)
            # sums in a fixed order on the CPU, so a resumed run repeats an uninterrupted one.
            x = x.flatten(0, 1).index_select(0, score_at)
        if targets is not None:
            # Training and evaluation need the loss, not the scores: head_cross_entropy
            # computes it without holding every position's vocab_size scores at once.
            loss = head_cross_entropy(x.reshape(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1))
            return None, loss
        return self.lm_head(x), None

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
        compile: bool = False,
        drop_finished: bool = True,
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

        compile: run the one-token decoding step through torch.compile. Its shapes are the
        same at every step (KVCache's slot), so it is compiled once per batch size, and
        the many small operations of a step at batch 1 become a few fused kernels. Where
        it cannot compile (no C++ compiler), a warning says so and generation goes on uncompiled.

        drop_finished: once a quarter of the rows the model still runs have stopped, leave them
        out of the batch (and the cache), so that a batch of answers of different lengths
        costs what its running rows cost, not what all of its rows cost until the longest
        ends. The draws do not change: the sampler still draws for every row (a stopped row
        from scores of zeros, its draw thrown away), so a seeded generator gives each row the
        same random numbers either way. Not with compile, whose shapes must stay fixed.
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
        # A one-token step with the cache sees every key stored so far that is not left
        # padding (column j of seq is slot j of the cache): the mask is made once here, and
        # is none at all when no prompt is padded, unless the step is compiled, which
        # attends to all block_size slots and hides those not written yet.
        columns = torch.arange(max(seq.size(1), block_size), device=device)
        key_is_real = (columns[None, :] >= pad[:, None])[:, None, None, :]  # (B, 1, 1, columns)
        slot = torch.zeros(1, dtype=torch.long, device=device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.wte.weight.dtype
        kv_cache = KVCache(self.config, len(prompts), device, dtype) if use_cache else None
        options = _compile_options(device.type) if compile else {}
        decode = torch.compile(decode_step, dynamic=False, options=options) if compile else None
        # Past the block every step runs the whole window again, block_size tokens, the same
        # shape each time: compiled too (at the first such step), it is no longer the slow part
        # of a long answer.
        window = torch.compile(self, dynamic=False, options=options) if compile else None
        slot_is_real = key_is_real[..., :block_size].contiguous()  # the compiled step's fixed-shape mask
        newest = seq[:, width - 1]  # each row's newest token: the compiled step's input
        compiled_before = False  # a compiled step ran: a later failure is not the compiler's absence

        def compiled(step: Callable, *args, **kwargs):
            """step(*args, **kwargs), or None where torch.compile cannot compile at all: it needs a
            working C++ compiler (Triton on CUDA), found only at the first call, which fails
            before it writes anything. Generation then goes on uncompiled."""
            nonlocal compile, compiled_before
            try:
                out = step(*args, **kwargs)
            except Exception as e:
                if compiled_before:
                    raise
                warnings.warn(f"torch.compile failed ({type(e).__name__}); generating without it")
                compile = False
                return None
            compiled_before = True
            return out

        # The rows the model still runs, in the cache's order, and their padding and masks: all
        # of them until drop_finished leaves stopped ones out.
        running = torch.arange(len(prompts), device=device)
        run_pad, run_key_is_real = pad, key_is_real
        padded = bool(pad.any())

        was_training = self.training
        self.eval()
        try:
            for step in range(max_new_tokens):
                end = width + step
                cached = kv_cache is not None and kv_cache.length > 0 and end <= block_size
                scores = None
                if cached and compile:
                    kv_cache.slot = slot.fill_(end - 1)  # the newest token's slot
                    scores = compiled(decode, self, newest[:, None], slot, pad, slot_is_real, kv_cache)
                    if scores is None:
                        kv_cache.slot = None  # this step runs uncompiled, below
                if scores is None and cached:
                    start = end - 1  # feed only the newest token; the cache holds the rest
                    logits, _ = self(seq[running, start:end], positions=(start - run_pad)[:, None], kv_cache=kv_cache,
                                     attn_mask=run_key_is_real[..., :end] if padded else None, last_only=True)
                elif scores is None:
                    if end > block_size:
                        kv_cache = None  # the cache cannot slide (positions are absolute)
                    start = max(0, end - block_size)  # the whole context, cropped to block_size
                    positions, mask = _window(start, end, run_pad)
                    inputs = dict(positions=positions, attn_mask=mask, kv_cache=kv_cache, last_only=True)
                    out = compiled(window, seq[running, start:end], **inputs) if compile and end > block_size else None
                    logits, _ = out if out is not None else self(seq[running, start:end], **inputs)
                if scores is None:
                    scores = logits[:, -1, :].float()
                if len(running) < len(prompts):  # every row gets scores, a dropped one zeros
                    scores = scores.new_zeros(len(prompts), scores.size(-1)).index_copy_(0, running, scores)
                mask = allowed(seq[:, width:end]) if allowed is not None else None
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf"))
                next_ids = sample_next(scores, temperature, top_k, top_p, generator)
                next_ids = next_ids.masked_fill(finished, -1)
                yield next_ids
                finished |= torch.isin(next_ids, stop)
                if finished.all():
                    return
                # Stopped rows the model still runs go on (batched compute) with a harmless token.
                newest = next_ids.clamp(min=0)
                seq[:, end] = newest
                if drop_finished and not compile:
                    still = ~finished[running]
                    if len(running) - int(still.sum()) >= max(1, len(running) // 4):
                        # Copying the cache's rows costs about one step; a quarter of the rows
                        # saved at every later step pays for it.
                        running = running[still]
                        if kv_cache is not None:
                            kv_cache.keep_rows(still.nonzero().squeeze(1))
                        run_pad, run_key_is_real = pad[running], key_is_real[running]
                        padded = bool(run_pad.any())
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


def decode_step(model: GPT, newest: torch.Tensor, slot: torch.Tensor, pad: torch.Tensor, slot_is_real: torch.Tensor,
                kv_cache: KVCache) -> torch.Tensor:
    """GPT.generate_stream's compiled step: each row's newest token (B, 1), at cache slot `slot`
    ((1,), the column of the left-padded sequence, so position slot - pad), attends to the
    slots up to its own that are not padding (slot_is_real: (B, 1, 1, block_size)); returns the
    next token's fp32 scores (B, vocab_size). Every input has the same shape at every step, so
    torch.compile compiles it once per batch size; the mask, the positions and the scores are
    made inside it, fused with the rest, not by eager operations around it at every token."""
    mask = slot_is_real & (torch.arange(slot_is_real.size(-1), device=slot.device) <= slot)
    logits, _ = model(newest, positions=(slot - pad)[:, None], attn_mask=mask, kv_cache=kv_cache, last_only=True)
    return logits[:, -1, :].float()


def one_row_products_as_loops(graph: torch.fx.Graph) -> None:
    """An Inductor pass (torch.compile's post_grad_custom_post_pass) for the compiled steps on a
    CPU: each matrix product of a single row, mm(x, W) or addmm(b, x, W) as nn.Linear becomes
    at one token a step, is rewritten as (x.T * W).sum(0) (+ b).

    Why: at one sample a step, every Linear is a vector times a matrix. Left as a product,
    Inductor hands each one to the BLAS library as a call of its own (4 a block, and the head),
    and each call first copies its bias into the output and its row into a buffer of its own.
    Written as a multiply-and-sum, the loop is Inductor's: fused with the norm, bias and
    activation around it, spread over the threads, no copies (docs/speed.md, Sampling).
    A batch of rows keeps its product, where the library's blocked kernels win. So do bf16 and
    fp16 products: rewritten, they round otherwise than the library does, and greedy answers
    parted from the eager ones."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function" or node.kwargs:  # kwargs: addmm's beta/alpha, not F.linear's
            continue
        if node.target is aten.mm.default:
            bias, (x, weight) = None, node.args
        elif node.target is aten.addmm.default:
            bias, x, weight = node.args
        else:
            continue
        if x.meta["val"].shape[0] != 1 or x.meta["val"].dtype != torch.float32:
            continue
        with graph.inserting_before(node):
            column = graph.call_function(aten.permute.default, (x, [1, 0]))  # (k, 1): x.T
            product = graph.call_function(aten.mul.Tensor, (column, weight))  # (k, n), never stored: fused into the sum
            out = graph.call_function(aten.sum.dim_IntList, (product, [0], True))  # (1, n): x @ weight
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (out, bias))
        out.meta = dict(node.meta)  # the same value: shape and dtype, as Inductor expects
        node.replace_all_uses_with(out)
        graph.erase_node(node)


@functools.cache
def _compile_options(device_type: str) -> dict:
    """torch.compile's Inductor options for generate_stream's compiled steps. One dict for the
    process: torch.compile reuses what it compiled only for options that compare equal."""
    if device_type != "cpu":
        return {}
    try:  # loads Inductor: only here, when something is compiled
        from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
    except ImportError:  # a torch without cacheable passes (before 2.6): compiled without the rewrite
        return {"cpp_wrapper": True}

    class OneRowProducts(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            one_row_products_as_loops(graph)

        def uuid(self) -> bytes:  # Inductor's cache of compiled code knows the pass by this file
            return get_hash_for_files((__file__,))

    # cpp_wrapper: the kernels are called from generated C++, not from Python: at one token a
    # step, Python's calls between them were a share of its time.
    return {"cpp_wrapper": True, "post_grad_custom_post_pass": OneRowProducts()}


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
    return draw(probs, generator)


# How draw() turns probabilities and a seeded generator into ids. Saved with cached samples
# (align.py's pairs): the same seed drew other ids with torch.multinomial, before.
SAMPLER = "inverse-cdf"


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of (B, vocab) probabilities, drawn with one uniform number a row: the
    first id whose running total of probability passes it (inverse-CDF sampling).

    torch.multinomial(probs, 1) draws an exponential random number for every id of every row
    and keeps the largest probs / draw: 9,274 random numbers a row, which on a CPU cost more
    than the model's whole decoding step for a batch of answers. The running total needs one.
    """
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]  # 1, up to rounding
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype) * total
    # The first id whose running total passes u. An id of probability 0 (masked out) adds
    # nothing to the total, so it is never that id.
    ids = torch.searchsorted(cumulative, u, right=True).clamp(max=probs.size(-1) - 1)
    # Two rare ways to land on such an id anyway: u rounded up to the total itself (no id passes
    # it; the clamp takes the last), or a parallel sum (CUDA) rounding two equal totals apart.
    zero = probs.gather(-1, ids) == 0
    if zero.any():
        ids = torch.where(zero, probs.argmax(dim=-1, keepdim=True), ids)
    return ids.squeeze(-1)

"""Losses: how a batch becomes a number to minimise, and how a model is scored on text.

- `causal_lm_loss`: the training loss of both stages so far, the model's own mean
  cross-entropy over labelled positions (labels of -100 are skipped), and
  `labelled_tokens`, the weight of a micro-batch in a step (see training.py).
- `labelled_logps`, `own_logps`, `token_logprobs`: the model's log-probabilities at the labelled
  positions alone (the head skips the prompt and the padding);
  `labelled_nll`: the same cross-entropy kept per row instead of averaged, for
  validation losses and for comparing one poem under two prompts.
- `stream_loss`: mean nats per token over a whole token stream.
- `bits_per_char`: nats per token -> bits per character, a figure that compares
  tokenizers (a char token and a tiktoken token cover different amounts of text).
- `input_swap_nll`: each response's NLL under its own input and under another sample's
  input; `title_swap_nll`, the same for poems under their titles: how much a model reads
  the title (or, for the title task, the poem).
- `dpo_loss`, `preference_loss`: preference tuning; `set_nll`, `rhyme_group_loss`: the
  probability of a set of allowed characters (a rhyme group) where a rule names it.
- `group_advantages`, `grpo_loss`: reinforcement learning on rewards the rules give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from data.conversations import rows_in_format
from data.corpus import Poem
from data.instruct import IGNORE, Sample, pad_batch, poem_sample
from data.tokenizer import Tokenizer
from model import GPT
from tanggpt.device import Runtime

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), labels IGNORE where nothing is to be learned


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of predicting each label from the inputs up to its position."""
    x, y = batch
    _, loss = model(x, y)
    return loss


def labelled_tokens(batch: Batch) -> int:
    """How many positions of the batch carry a label: what causal_lm_loss averages over."""
    return int((batch[1] != IGNORE).sum())


def labelled_logps(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions (of the B * T, row by row) whose label is not IGNORE, and the model's
    log-softmax there alone ((positions, vocab), fp32): the head and the softmax over the
    vocabulary, the costliest part of a loss, are not spent on the prompt and the padding."""
    at = (labels.flatten() != IGNORE).nonzero().squeeze(1)
    logits, _ = model(inputs, score_at=at)
    return at, torch.log_softmax(logits.float(), dim=-1)


def own_logps(logps: torch.Tensor, labels: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """At each labelled position `at` (labelled_logps' positions and log-probabilities), the
    log-probability of its own label."""
    return logps.gather(1, labels.flatten()[at].unsqueeze(1)).squeeze(1)


def token_logprobs(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T): the log-probability of each label under the model, 0 where the label is IGNORE."""
    at, logps = labelled_logps(model, inputs, labels)
    own = own_logps(logps, labels, at)
    return torch.zeros(labels.numel(), device=own.device, dtype=own.dtype).index_copy(0, at, own).view(labels.shape)


@torch.no_grad()
def labelled_nll(model: GPT, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                 runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (inputs, labels): the summed cross-entropy in nats over its labelled
    positions, and how many there are. Rows are batched by length (less padding).

    The same cross-entropy as GPT.forward's loss, kept per row instead of averaged: a
    validation loss is the sum over rows / the count, and evaluate.py compares single
    poems under two titles.
    """
    was_training = model.training
    model.eval()
    nll, count = torch.zeros(len(rows)), torch.zeros(len(rows), dtype=torch.long)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for start in range(0, len(rows), batch_size):
        chunk = order[start : start + batch_size]
        x, y = pad_batch([rows[i] for i in chunk], pad_id)
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            nll[chunk] = -token_logprobs(model, x, y).sum(dim=1).cpu()
        count[chunk] = (y != IGNORE).sum(dim=1).cpu()
    model.train(was_training)
    return nll, count


def response_loss(model: GPT, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int,
                  runtime: Runtime) -> float:
    """Mean cross-entropy per labelled token over all rows: every response loss a stage logs
    or evaluate.py reports (the finetune-val loss over data.tasks.finetune_val_rows above all)."""
    nll, count = labelled_nll(model, rows, pad_id, batch_size, runtime)
    return float(nll.sum() / count.sum())


@torch.no_grad()
def stream_loss(model: GPT, tokens: np.ndarray, batch_size: int, runtime: Runtime) -> float:
    """Mean nats per token over a whole token stream, cut into consecutive block_size windows."""
    block = model.config.block_size
    n = (len(tokens) - 1) // block
    ids = torch.from_numpy(tokens[: n * block + 1].astype(np.int64))
    x, y = ids[:-1].view(n, block), ids[1:].view(n, block)
    total = 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with runtime.autocast():
            _, loss = model(xb.to(runtime.device), yb.to(runtime.device))
        total += loss.item() * yb.numel()
    return total / (n * block)


def bits_per_char(nats_per_token: float, tokens: int, chars: int) -> float:
    """A loss in nats per token, over text of `tokens` tokens and `chars` characters, in bits per character."""
    return nats_per_token * tokens / chars / math.log(2)


@dataclass
class TitleSwap:
    """Per poem (those whose samples fit the block, by index into the poems): the response NLL
    in nats under its own title and under another poem's title, and its labelled tokens."""

    poems: list[int]
    nll_own: torch.Tensor
    nll_swapped: torch.Tensor
    count: torch.Tensor

    @property
    def gains(self) -> torch.Tensor:
        """log p(poem | own title) - log p(poem | other title), nats per poem: > 0 means the title is read."""
        return self.nll_swapped - self.nll_own


def input_swap_nll(model: GPT, tokenizer: Tokenizer, samples: list[Sample], batch_size: int, runtime: Runtime,
                   seed: int, chat: bool = False) -> TitleSwap:
    """Each sample's response under its own input, and under the input of another sample: a
    seeded shuffle pairs each sample with the next one in it, so every input is used once as
    the "other". For poem samples the input is the title; for the title task, the poem.
    With `chat`, each sample is asked as a one-turn conversation (a chat model's format)."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    other_input = {i: samples[j].input for i, j in zip(order, order[1:] + order[:1])}
    block_size = model.config.block_size
    rows = rows_in_format(chat)
    own = rows(tokenizer, samples, block_size)
    swapped = rows(tokenizer, [Sample(s.instruction, other_input[i], s.response) for i, s in enumerate(samples)],
                   block_size)
    fits = [i for i in range(len(samples)) if own[i] is not None and swapped[i] is not None]
    nll_own, count = labelled_nll(model, [own[i] for i in fits], tokenizer.eot_id, batch_size, runtime)
    nll_swapped, _ = labelled_nll(model, [swapped[i] for i in fits], tokenizer.eot_id, batch_size, runtime)
    return TitleSwap(fits, nll_own, nll_swapped, count)


def title_swap_nll(model: GPT, tokenizer: Tokenizer, poems: list[Poem], batch_size: int, runtime: Runtime,
                   seed: int, chat: bool = False) -> TitleSwap:
    """Each poem under its own title, and under the title of another poem (input_swap_nll)."""
    return input_swap_nll(model, tokenizer, [poem_sample(p) for p in poems], batch_size, runtime, seed, chat)


# -----------------------------------------------------------------------------
# Preference tuning (DPO)


class PreferenceBatch(NamedTuple):
    """B preference pairs as one padded batch of 2B rows: the chosen answers, then the
    rejected ones, each after its prompt, labelled on the response and end-of-text only."""

    inputs: torch.Tensor  # (2B, T)
    labels: torch.Tensor  # (2B, T), IGNORE on the prompt and the padding
    reference_logps: torch.Tensor  # (2B,) the frozen reference model's sequence log-probabilities


def sequence_logprobs(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: log p(response | prompt), the sum of the labelled tokens' log-probabilities.

    A sum, not a mean: DPO compares the probabilities of whole answers, and an answer's
    probability is the product of its tokens'. The end-of-text token is labelled, so
    stopping where it did is part of the answer.
    """
    return token_logprobs(model, inputs, labels).sum(dim=-1)


class DPOTerms(NamedTuple):
    losses: torch.Tensor  # (B,) -log sigmoid(margin)
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log pi_ref) of the chosen answer
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> DPOTerms:
    """Direct Preference Optimization (Rafailov et al. 2023), per pair.

    The implicit reward of an answer is beta * log(pi(answer) / pi_ref(answer)): how much
    more likely the tuned policy makes it than the frozen reference. The loss is the
    logistic loss of the chosen answer's reward beating the rejected one's,
    -log sigmoid(r_chosen - r_rejected): log 2 at the start (policy = reference), falling
    as the margin grows. beta sets how far the policy may move for a given margin: a small
    beta lets it move far from the reference.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return DPOTerms(losses, chosen_rewards, rejected_rewards)


def preference_loss(model: torch.nn.Module, batch: PreferenceBatch, beta: float, sft_weight: float) -> torch.Tensor:
    """The mean DPO loss of the batch's pairs, plus sft_weight x the chosen answers' mean
    cross-entropy per token (an RPO-style anchor, Pang et al. 2024).

    DPO alone only asks that the chosen answer gain on the rejected one; both may lose
    probability, and the mass they lose goes to answers neither pair shows (likelihood
    displacement): the distribution drifts. The anchor keeps the chosen answers likely.
    """
    logps = sequence_logprobs(model, batch.inputs, batch.labels)
    pairs = len(logps) // 2
    terms = dpo_loss(logps[:pairs], logps[pairs:], batch.reference_logps[:pairs], batch.reference_logps[pairs:], beta)
    loss = terms.losses.mean()
    if sft_weight:
        chosen_tokens = (batch.labels[:pairs] != IGNORE).sum()
        loss = loss + sft_weight * -logps[:pairs].sum() / chosen_tokens
    return loss


def set_nll(logps: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """(rows,): -log of the probability each row of log-probabilities (rows, vocab) gives to the
    whole set of tokens its `allowed` row (rows, vocab) bool marks."""
    return -torch.logsumexp(logps.masked_fill(~allowed, -math.inf), dim=-1)


def rhyme_group_loss(logps: torch.Tensor, rhyme_sets: torch.Tensor, group_masks: torch.Tensor) -> torch.Tensor:
    """At each rhyme position, -log of the probability the model gives to the whole rhyme group
    (set_nll), averaged.

    logps are the model's log-probabilities at some labelled positions (labelled_logps: a
    poem's response), rhyme_sets holds, at each of them, the index of the set of characters
    that rhyme there (a row of group_masks, (sets, vocab) bool) where it predicts a rhyme
    character, and IGNORE elsewhere. Cross-entropy would reward the one character the poem
    used; this rewards any character of the group, the thing to learn: it costs nothing to
    rhyme on 霜 rather than 鄉, and everything to rhyme on neither.
    """
    placed = rhyme_sets != IGNORE
    return set_nll(logps[placed], group_masks[rhyme_sets[placed]]).mean()


# -----------------------------------------------------------------------------
# Reinforcement learning (GRPO)


class RolloutBatch(NamedTuple):
    """Sampled answers as one padded batch: each row a prompt and the answer the policy wrote,
    labelled on the answer's tokens (and its end-of-text, if it stopped)."""

    inputs: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE on the prompt and the padding
    advantages: torch.Tensor  # (B,) each answer's reward against its group's (group_advantages)
    reference_logps: torch.Tensor  # (B, T) the frozen --init model's log-probability of each label (0 elsewhere)
    # Where a rule names what to write (tanggpt/rule_targets.py): at the position predicting such
    # a character, the index of its allowed set (a row of target_masks), IGNORE elsewhere. None: no targets.
    target_labels: torch.Tensor | None = None  # (B, T)
    target_masks: torch.Tensor | None = None  # (sets, vocab) bool


def group_advantages(rewards: torch.Tensor, group_size: int, shapes: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's advantage: each answer's reward minus the mean reward of its group, the
    group_size answers to the same prompt (consecutive in `rewards`). No value network:
    the group is the baseline.

    Not divided by the group's spread (as Dr. GRPO, Liu et al. 2025, argue): the rewards give
    partial credit, so the answers of an easy or a hopeless prompt often differ by a hair,
    and dividing by that hair would turn noise into full-size advantages. A group whose
    answers all score the same gets zero: it has nothing to teach.

    With `shapes` (one number per answer, rollouts.answer_shape), an answer is compared only
    with the answers of its group that have its shape: a quatrain with quatrains, a 律詩 with
    律詩. The reward then says how well a poem of the chosen shape is written, never which
    shape to choose (the baseline of an answer alone in its shape is itself: advantage 0).
    """
    groups = rewards.view(-1, group_size)
    if shapes is None:
        return (groups - groups.mean(dim=1, keepdim=True)).flatten()
    shapes = shapes.view(-1, group_size)
    same = (shapes[:, :, None] == shapes[:, None, :]).float()  # (groups, answer, its siblings of its shape)
    baseline = (same * groups[:, None, :]).sum(dim=-1) / same.sum(dim=-1)
    return (groups - baseline).flatten()


def grpo_loss(model: torch.nn.Module, batch: RolloutBatch, kl_weight: float, target_weight: float = 0.0
              ) -> torch.Tensor:
    """The policy-gradient loss of GRPO (Shao et al. 2024), per answer token, for one on-policy
    update: the answers were sampled from these very weights, and are used for one step.

    The ratio pi(token) / pi_old(token) is 1 in value (pi_old is pi, detached) but carries
    the gradient of log pi: minimising -ratio x advantage raises the probability of every
    token of an answer that beat its group and lowers those of an answer that fell short.
    (With several updates per batch, PPO's clip would cap how far the ratio may move; at
    one update it never moves.) kl_weight adds k3 = exp(d) - d - 1, d = log pi_ref - log pi,
    an estimate of KL(pi || pi_ref) that is never negative: it holds the policy near --init.

    The mean is over every answer token of the batch (token-level, as DAPO): each token
    counts once, so a long answer is not weighed less per token than a short one, and a
    policy gains nothing by changing its length alone.

    target_weight adds, at each place of an answer where a rule names what to write
    (batch.target_labels: an acrostic head, a rhyme group), -log of the probability of what the
    rule allows there, times target_weight, summed into the same mean over answer tokens: such
    a place weighs like one more token whose advantage is target_weight (rule_targets.py).
    """
    # Only the answer tokens are scored: the prompt and padding rows (about half the batch) are
    # left out before the head and the softmax over the vocabulary.
    at, logps = labelled_logps(model, batch.inputs, batch.labels)  # (answer tokens, vocab)
    own = own_logps(logps, batch.labels, at)  # log pi of each sampled token
    advantages = batch.advantages[:, None].expand(batch.labels.shape).flatten()[at]
    per_token = -torch.exp(own - own.detach()) * advantages
    if kl_weight:
        delta = batch.reference_logps.flatten()[at] - own
        per_token = per_token + kl_weight * (torch.exp(delta) - delta - 1)
    total = per_token.sum()
    if target_weight and batch.target_labels is not None:
        sets = batch.target_labels.flatten()[at]  # a rule's place is an answer token: predicted, and labelled
        placed = sets != IGNORE
        total = total + target_weight * set_nll(logps[placed], batch.target_masks[sets[placed]]).sum()
    return total / len(at)

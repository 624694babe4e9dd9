"""Muon: momentum, orthogonalised, for the weight matrices of the transformer's blocks.

AdamW scales each number of the gradient on its own. Muon treats a weight matrix as a
matrix: it keeps a momentum of the gradient, as SGD does, and before applying it replaces
the momentum matrix M = U S V^T by (nearly) U V^T, the orthogonal matrix closest to it.
Every direction the gradient points in then moves by the same amount, so the few
directions that dominate a raw gradient no longer drown the rest. At small scale that
learns more per token than AdamW (Keller Jordan's modded-nanogpt, nanochat).

U V^T is not computed with an SVD (slow) but with five steps of a Newton-Schulz iteration,
matmuls only. Muon is for 2-D matrices inside the network: embeddings, the output head
and the 1-D gains and biases stay with AdamW (training.configure_optimizer splits them).
"""

from __future__ import annotations

import torch


def orthogonalise(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U V^T for matrix = U S V^T, by a quintic Newton-Schulz iteration.

    Each step maps every singular value s to a s + b s^3 + c s^5, a polynomial picked
    (Keller Jordan's coefficients) to push values in (0, 1] towards 1 fast; it need not
    land on 1 exactly (it ends in about [0.7, 1.2]), which works as well for training.
    A stack of matrices (..., rows, cols) is orthogonalised each on its own, in one
    batched matmul per product instead of one call per matrix.
    """
    x = matrix / (matrix.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values now at most 1
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the smaller Gram matrix x x^T
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with muon=True take Muon steps, the others AdamW's.

    One object, so the training loop, its learning-rate schedule and the checkpoint see a
    single optimizer whatever the rule. Each group's "lr" is what the schedule sets; a
    Muon group multiplies it by its "lr_scale" (Muon's steps have a fixed size per matrix,
    so it wants a larger learning rate than AdamW).
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, momentum: float = 0.95, lr_scale: float = 10.0):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, momentum=momentum,
                        lr_scale=lr_scale)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, beta = group["lr"] * group["lr_scale"], group["momentum"]
        updates = []
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum"] = torch.zeros_like(p)
            momentum = state["momentum"]
            momentum.lerp_(p.grad, 1 - beta)
            updates.append(p.grad.lerp(momentum, beta))  # Nesterov: look one momentum step ahead
        # Matrices of one shape (every block's c_attn, say) are orthogonalised together.
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        for indices in by_shape.values():
            stacked = orthogonalise(torch.stack([updates[i] for i in indices]).float())
            for i, update in zip(indices, stacked.unbind()):
                p = params[i]
                # A tall matrix's orthogonal update has smaller entries; scale them up to match.
                update = update.to(p.dtype) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr)

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch.optim.AdamW's update, written out: decoupled decay, bias-corrected moments."""
        (beta1, beta2), lr = group["betas"], group["lr"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"]
            p.mul_(1 - lr * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))

"""tanggpt/muon.py: the orthogonalised update, and the AdamW it keeps for the other parameters."""

import torch

from model import GPT, GPTConfig
from tanggpt.lora import add_adapters
from tanggpt.muon import MuonWithAdamW, orthogonalise
from tanggpt.training import TrainConfig, configure_optimizer


def test_orthogonalise_brings_every_singular_value_near_one():
    torch.manual_seed(0)
    for rows, cols in ((64, 16), (16, 64)):
        # A gradient-like matrix whose directions differ 30-fold in strength.
        m = torch.randn(rows, cols) @ torch.diag(torch.logspace(-1.5, 0, cols)) if rows > cols else \
            torch.diag(torch.logspace(-1.5, 0, rows)) @ torch.randn(rows, cols)
        before, after = torch.linalg.svdvals(m), torch.linalg.svdvals(orthogonalise(m))
        assert before.max() / before.min() > 10
        assert after.min() > 0.5 and after.max() < 1.25  # every direction moves by about as much


def test_a_stack_of_matrices_is_orthogonalised_each_on_its_own():
    torch.manual_seed(0)
    stack = torch.randn(3, 24, 8) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]  # scales far apart
    together = orthogonalise(stack)
    for matrix, result in zip(stack, together):
        assert torch.allclose(result, orthogonalise(matrix), atol=1e-5)


def test_the_adamw_groups_take_torch_adamw_steps():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = MuonWithAdamW([{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]]}], lr=1e-2)
    reference = torch.optim.AdamW([{"params": [twins[0]], "weight_decay": 0.1}, {"params": [twins[1]],
                                   "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        ours.step()
        reference.step()
    for p, t in zip(params, twins):
        assert torch.allclose(p, t, atol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    add_adapters(model, rank=2, alpha=4, targets="all")
    optimizer = configure_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    adamw = [names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
    # LoRA froze the base weights: only the adapters train, and their factors stay with AdamW.
    assert muon == [] and adamw and all("lora_" in n for n in adamw)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = configure_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert "wte.weight" not in muon and len(muon) == 2 * 4


def test_muon_trains_and_its_state_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = configure_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3), torch.device("cpu"))
    data = torch.randint(0, 30, (4, 17))
    losses = []
    for _ in range(40):
        _, loss = model(data[:, :-1], data[:, 1:])
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0] - 1.0
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    again = configure_optimizer(model, TrainConfig(optimizer="muon", lr=3e-3), torch.device("cpu"))
    again.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert again.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()

"""GPTConfig(**GPT2_BLOCK) is GPT-2: with Hugging Face's GPT-2 weights copied in, it computes
the same logits and the same loss.

Both models are built from a config with random weights (nothing is downloaded): the test
checks the architecture, the weight layout and the loss, not a trained checkpoint.
"""

import torch
import transformers

from model import GPT, GPT2_BLOCK, GPTConfig

SHAPE = dict(vocab_size=97, block_size=24, n_layer=3, n_head=4, n_embd=32)


def hugging_face_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=SHAPE["vocab_size"], n_positions=SHAPE["block_size"],
                                     n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], n_embd=SHAPE["n_embd"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def ours_from(hf) -> GPT:
    """Our GPT-2-block model holding the Hugging Face model's weights."""
    model = GPT(GPTConfig(**SHAPE, **GPT2_BLOCK)).eval()
    theirs = hf.state_dict()
    ours = {}
    for name in model.state_dict():
        # blocks.0.attn.c_attn.weight -> transformer.h.0.attn.c_attn.weight; the other names match
        source = name if name == "lm_head.weight" else "transformer." + name.replace("blocks.", "h.")
        weight = theirs[source]
        # Hugging Face's GPT-2 stores its linear layers as Conv1D: (in, out), the transpose of nn.Linear's.
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            weight = weight.t()
        ours[name] = weight
    model.load_state_dict(ours)
    return model


def test_the_gpt2_block_computes_hugging_faces_gpt2_logits_and_loss():
    hf = hugging_face_gpt2()
    model = ours_from(hf)
    torch.manual_seed(1)
    idx = torch.randint(0, SHAPE["vocab_size"], (3, SHAPE["block_size"]))
    with torch.no_grad():
        expected = hf(idx, labels=idx)
        logits, _ = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])  # Hugging Face shifts the labels itself
    assert torch.allclose(logits, expected.logits, atol=1e-5)
    assert torch.allclose(loss, expected.loss, atol=1e-5)
    assert logits.std() > 0.01  # random weights of GPT-2's scale: not a trivially equal output


def test_the_default_block_is_not_gpt2():
    """The same weights in the default block (RoPE, RMSNorm, ReLU², QK-norm) give other logits:
    the parity above is the GPT-2 block's, not any model's."""
    hf = hugging_face_gpt2()
    gpt2_like = ours_from(hf)
    default = GPT(GPTConfig(**SHAPE)).eval()
    shared = {k: v for k, v in gpt2_like.state_dict().items() if k in default.state_dict()
              and v.shape == default.state_dict()[k].shape}
    default.load_state_dict(shared, strict=False)
    idx = torch.randint(0, SHAPE["vocab_size"], (2, 10))
    with torch.no_grad():
        assert not torch.allclose(default(idx)[0], hf(idx).logits, atol=1e-3)

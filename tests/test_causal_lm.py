"""The causal-LM task on a tiny random LLaMA: loss masking, the loss and perplexity math, partitions by group,
config defaults, and PEFT export that PeftModel loads onto the base model with the same logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.adapters import adapter_layers, adapter_state, inject_adapters, load_adapter_state
from fedlora.adapters.peft_io import save_peft_adapter
from fedlora.causal_lm.data import (
    IGNORE,
    PROMPT_TEMPLATE,
    LMDataset,
    encode_lm,
    instruction_ids,
    load_lm_dataset,
    partition_by_label,
)
from fedlora.causal_lm.model import LLAMA_TARGETS, load_causal_lm
from fedlora.causal_lm.train import evaluate_lm, lm_loss
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.models import tiny_tokenizer
from fedlora.tasks import get_task

# A minimal ChatML template (the family SmolLM2 uses), to test the chat-template path without a download.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = tiny_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def instruction_data() -> LMDataset:
    return LMDataset(["she walked to the house.", "no"], [0, 0], ["all"],
                     prompts=[("where did she walk", ""), ("was he pleased", "mr darcy smiled")])


@pytest.mark.parametrize("which", ["template", "chat"])
def test_instruction_loss_covers_only_the_response(which, tok, chat_tok) -> None:
    t = tok if which == "template" else chat_tok
    ds = instruction_data()
    enc = encode_lm(t, ds, max_length=64)
    for row, ((ins, inp), resp) in enumerate(zip(ds.prompts, ds.texts, strict=True)):
        p, r = instruction_ids(t, ins, inp, resp)
        labels, ids = enc["labels"][row], enc["input_ids"][row]
        assert ids[: len(p) + len(r)].tolist() == p + r
        # labels: -100 over the prompt and the padding, the ids themselves over the response
        assert labels[: len(p)].eq(IGNORE).all()
        assert labels[len(p): len(p) + len(r)].tolist() == r
        assert labels[len(p) + len(r):].eq(IGNORE).all()
        assert enc["attention_mask"][row].sum() == len(p) + len(r)
        decoded = t.decode(r, skip_special_tokens=True)
        assert decoded.replace(" ", "") == resp.replace(" ", "")  # the labelled span is exactly the response
    if which == "template":
        prompt = t.decode(instruction_ids(t, "x", "", "y")[0])  # the tiny vocabulary has no '#': [UNK]
        assert prompt.index("instruction : x") < prompt.index("response :") and prompt.endswith("response :")
        assert PROMPT_TEMPLATE.startswith("### Instruction:")
    else:  # the chat template's end-of-turn closes the response and is learned; the assistant header is not
        _, r = instruction_ids(t, "x", "", "y")
        assert t.convert_tokens_to_ids("<|im_end|>") in r
        p, _ = instruction_ids(t, "x", "", "y")
        assert p[-2:] == t("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-2:]


def test_text_padding_is_masked_and_documents_end_with_eos(tok) -> None:
    ds = LMDataset(["a short one.", "a much longer paragraph about the weather at longbourn in november."],
                   [0, 1], ["a", "b"])
    enc = encode_lm(tok, ds, max_length=64)
    mask, labels, ids = enc["attention_mask"], enc["labels"], enc["input_ids"]
    assert mask[0].sum() < mask[1].sum() == ids.shape[1]
    assert torch.equal(labels == IGNORE, mask == 0)  # padding and only padding is ignored
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    for row in range(2):
        assert ids[row, int(mask[row].sum()) - 1] == tok.sep_token_id  # closed by EOS ([SEP] here)


def test_truncation_and_packing(tok) -> None:
    ds = LMDataset(["one two three four five six seven eight nine ten"] * 5, [0] * 5, ["all"])
    enc = encode_lm(tok, ds, max_length=8)
    assert enc["input_ids"].shape == (5, 8)
    packed = encode_lm(tok, ds, max_length=8, packing=True)
    n_tokens = 5 * (10 + 2)  # [CLS] ten words [SEP]
    assert packed["input_ids"].shape == (n_tokens // 8, 8)  # full windows only
    assert packed["attention_mask"].all() and torch.equal(packed["labels"], packed["input_ids"])
    with pytest.raises(ValueError, match="plain text"):
        encode_lm(tok, instruction_data(), max_length=8, packing=True)
    with pytest.raises(ValueError, match="model.max-length"):  # prompts longer than max-length leave no target
        encode_lm(tok, instruction_data(), max_length=4)


def test_loss_is_a_mean_of_per_example_means() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = IGNORE  # example 0 has 2 targets (positions 1, 2), example 1 has 5
    per = []
    for b in range(2):
        valid = [(t, int(labels[b, t + 1])) for t in range(5) if labels[b, t + 1] != IGNORE]
        per.append(sum(-torch.log_softmax(logits[b, t], -1)[y] for t, y in valid) / len(valid))
    assert torch.allclose(lm_loss(logits, labels), (per[0] + per[1]) / 2, atol=1e-6)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert not torch.allclose(lm_loss(logits, labels), token_mean, atol=1e-3)  # not the batch token mean


def test_perplexity_matches_transformers_token_loss(tok) -> None:
    model = load_causal_lm("tiny", seed=0)
    ds = LMDataset(["it is a truth universally acknowledged.", "emma woodhouse, handsome, clever, and rich."],
                   [0, 0], ["all"])
    enc = encode_lm(tok, ds, max_length=32)
    out = evaluate_lm(model, enc, batch_size=1)
    with torch.no_grad():  # HF's loss: mean over every target token of the batch (labels -100 ignored)
        hf = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["labels"]).loss
    assert out["loss"] == pytest.approx(float(hf), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(float(hf)), rel=1e-5)
    assert out["tokens"] == float((enc["labels"][:, 1:] != IGNORE).sum())


def test_partition_by_label() -> None:
    labels = [i % 6 for i in range(60)] + [5] * 7
    six = partition_by_label(labels, 6, 6)
    assert [sorted({labels[i] for i in p}) for p in six] == [[k] for k in range(6)]
    twelve = partition_by_label(labels, 12, 6)
    assert {labels[i] for i in twelve[7]} == {1} and set(twelve[1]).isdisjoint(twelve[7])
    three = partition_by_label(labels, 3, 6)
    assert [sorted({labels[i] for i in p}) for p in three] == [[0, 3], [1, 4], [2, 5]]
    for parts in (six, twelve, three):
        assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    with pytest.raises(ValueError, match="empty"):
        partition_by_label([0, 0, 1], 4, 2)


def test_austen_one_novel_per_client() -> None:
    ds = load_lm_dataset("austen", "test")
    parts = partition_by_label(ds.labels, 6, ds.num_labels)
    assert [len({ds.labels[i] for i in p}) for p in parts] == [1] * 6
    assert [len(p) for p in parts] == [219, 237, 254, 285, 136, 133]  # the README's test counts per novel


def test_local_instruction_and_text_folders(tmp_path) -> None:
    rows = [{"instruction": "say hi", "response": "hi", "label": "x"},
            {"instruction": "say no", "input": "now", "response": "no", "label": "y"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_lm_dataset(str(tmp_path), "train", "instruction")
    assert ds.prompts == [("say hi", ""), ("say no", "now")] and ds.texts == ["hi", "no"] and ds.labels == [0, 1]
    with pytest.raises(ValueError, match="data.text-field"):
        load_lm_dataset(str(tmp_path), "train", "text", "body")
    (tmp_path / "test.txt").write_text("first line\n\nsecond line\n")
    assert load_lm_dataset(str(tmp_path), "test").texts == ["first line", "second line"]


def test_config_task_defaults_and_errors() -> None:
    cfg = FedLoraConfig.from_run_config({"model.task": "causal_lm"})
    assert cfg.adapter.target_modules == LLAMA_TARGETS and cfg.adapter.heads() == []
    kept = FedLoraConfig.from_run_config({"model.task": "causal_lm", "adapter.target-modules": "q_proj,gate_proj"})
    assert kept.adapter.targets() == ["q_proj", "gate_proj"]
    assert FedLoraConfig.from_run_config({}).adapter.targets() == ["query", "value"]  # classification unchanged
    bad = [({"data.partition": "label"}, "data.partition"),
           ({"model.task": "lm"}, "model.task"),
           ({"model.task": "causal_lm", "data.packing": True, "privacy.mode": "sample",
             "privacy.noise-multiplier": 1.0}, "data.packing"),
           ({"model.task": "causal_lm", "model.dtype": "float16"}, "model.dtype"),
           ({"data.format": "instruction"}, "data.format")]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            FedLoraConfig.from_run_config(overrides)


@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_peft_export_loads_onto_the_base_causal_lm(mode, tmp_path) -> None:
    from peft import PeftModel

    cfg = FedLoraConfig.from_run_config({"model.task": "causal_lm", "adapter.rank": 4})
    model = get_task(cfg).build_model(mode, 4)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    assert sorted({p.rpartition(".")[2] for p in adapter_layers(model)}) == sorted(LLAMA_TARGETS.split(","))
    folder = save_peft_adapter(adapter_state(model), cfg, tmp_path / "adapter")
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    peft_model = PeftModel.from_pretrained(load_causal_lm("tiny", seed=cfg.run.seed), str(folder)).eval()
    ids = torch.randint(5, 4000, (2, 12), generator=gen)
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        base = load_causal_lm("tiny", seed=cfg.run.seed)(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5)


def _adapter_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same adapter init for every model compared
    inject_adapters(model, LLAMA_TARGETS.split(","), rank=2, alpha=4)
    for layer in adapter_layers(model).values():  # B != 0 so that A gets a gradient too
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1, generator=torch.Generator().manual_seed(3))
    model.train()
    lm_loss(model(input_ids=ids).logits, ids).backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients_and_bfloat16_trains() -> None:
    ids = torch.randint(5, 4000, (2, 10), generator=torch.Generator().manual_seed(0))
    plain = _adapter_grads(load_causal_lm("tiny", seed=0), ids)
    checkpointed = _adapter_grads(load_causal_lm("tiny", seed=0, gradient_checkpointing=True), ids)
    assert len(plain) == 2 * 4 * 2 and set(plain) == set(checkpointed)  # A, B x 4 projections x 2 layers
    for name, g in plain.items():
        assert g.abs().sum() > 0 and torch.allclose(g, checkpointed[name], atol=1e-6), name
    bf16 = load_causal_lm("tiny", seed=0, dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    half = _adapter_grads(bf16, ids)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in half.values())

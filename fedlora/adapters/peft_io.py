"""Export a global adapter state in peft's LoRA format (``adapter_model.safetensors`` +
``adapter_config.json``), so a run's result loads with ``PeftModel.from_pretrained(base, folder)``.

Every fedlora parameterisation is a LoRA in disguise: LoRA-SB's B R A is the LoRA (B R, A), FLoRA's merged
factors are a LoRA of rank m with scaling 1 (alpha = m, through peft's rank/alpha patterns), and FedEx-LoRA's
folded residual and adapter together the LoRA ([MB, s B], [MA; A]) of rank m + r with scaling 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora import naming
from fedlora.config import FedLoraConfig

PREFIX = "base_model.model."


def to_peft(state: dict[str, torch.Tensor], rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft tensors, peft LoraConfig fields) for ``state``; layers with an empty update are skipped."""
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    layers = naming.layers_of(state)
    targets: set[str] = set()
    for layer in layers:
        get = {role: state.get(naming.key(layer, role)) for role in naming.ROLES}
        if get["MA"] is not None:
            a, b = get["MA"], get["MB"]
            if get["A"] is not None:  # FedEx-LoRA: the folded residual beside the adapter, [MB, s B] @ [MA; A]
                s = alpha / get["A"].shape[0]
                a, b = torch.cat([a, get["A"]]), torch.cat([b, s * get["B"]], dim=1)
            if a.shape[0] == 0:
                continue
            rank_pattern[layer], alpha_pattern[layer] = a.shape[0], float(a.shape[0])  # scaling 1
        else:
            a, b = get["A"], get["B"]
            if get["R"] is not None:
                b = b @ get["R"]
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = b.contiguous()
        targets.add(layer.rpartition(".")[2])
    heads = sorted({n.rpartition(".")[0] for n in state if naming.is_extra(n)})
    for name, t in state.items():
        if naming.is_extra(name):
            tensors[PREFIX + name] = t.contiguous()
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(targets), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": heads or None, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
    }
    return tensors, config


def save_peft_adapter(state: dict[str, torch.Tensor], cfg: FedLoraConfig, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, config = to_peft(state, cfg.adapter.rank, cfg.adapter.alpha)
    config["base_model_name_or_path"] = cfg.model.name
    from fedlora.tasks import get_task

    config["task_type"] = get_task(cfg).peft_task_type
    if cfg.model.name == "smollm2":  # the converted folder, so AutoPeftModelForCausalLM finds the base offline
        from fedlora.causal_lm.model import SMOLLM2, resolve

        config["base_model_name_or_path"] = resolve(SMOLLM2)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder

"""What a causal-LM run leaves for a person to read: perplexity per round and greedy generations from fixed
prompts, before (the base model) and after federated fine-tuning (the global adapter merged in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedlora.aggregation import Aggregator
from fedlora.causal_lm.train import generate

if TYPE_CHECKING:
    from fedlora.tasks.causal_lm import CausalLMTask


def write_generations(task: CausalLMTask, agg: Aggregator, state: dict[str, torch.Tensor], out: Path,
                      max_new_tokens: int = 40) -> Path:
    """``generations.jsonl`` (prompt, base, finetuned) and ``generations.md`` in ``out``; returns the .md path."""
    from fedlora.export import merged_model

    cfg = task.cfg
    prompts = task.generation_prompts()
    tok = task.tokenizer()
    ids = [p for _, p in prompts]
    before = generate(task.base_model(), tok, ids, max_new_tokens)
    after = generate(merged_model(cfg, agg, state), tok, ids, max_new_tokens)
    rows = [{"prompt": text, "base": b, "finetuned": a} for (text, _), b, a in zip(prompts, before, after, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lines = [f"# Greedy generations ({max_new_tokens} new tokens)", "",
             f"model `{cfg.model.name}`, method `{cfg.method.name}`, {cfg.run.num_server_rounds} rounds, data "
             f"`{cfg.data.source}` ({cfg.data.format}, partition {cfg.data.partition})", ""]
    for row in rows:
        lines += [f"## {row['prompt']}", "", f"- base: {row['base']}", f"- fine-tuned: {row['finetuned']}", ""]
    path = out / "generations.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

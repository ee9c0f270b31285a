"""The causal-LM task end to end through the real ServerApp and ClientApp (in-process grid, wire round trips) on
a tiny random LLaMA: every aggregator, DP-SGD, one novel per client, perplexity and generations."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora import naming
from fedlora.aggregation import aggregator_class, available
from fedlora.checkpoint import load_checkpoint
from fedlora.components import make_aggregator
from fedlora.config import FedLoraConfig
from fedlora.server import initial_state
from tests.conftest import HETEROGENEOUS, RANKS, run_local

LM = {"model.task": "causal_lm", "train.lr": 0.01, "data.max-eval-examples": 64}


def _adapter_changed(out, overrides) -> bool:
    cfg = FedLoraConfig.from_run_config({**LM, **overrides, "adapter.rank": 4, "output-dir": str(out)})
    start = initial_state(cfg, make_aggregator(cfg))
    final, _, _ = load_checkpoint(out)
    assert set(final) == set(start)
    return any(naming.split(k) and (final[k].shape != start[k].shape or not torch.equal(final[k], start[k]))
               for k in final)


@pytest.mark.parametrize("method", available())
def test_every_method_fine_tunes_the_causal_lm(method, tmp_path) -> None:
    personal = bool(aggregator_class(method).personal)  # FedSA-LoRA: each client's own B; no global model
    overrides = {"method.name": method, **({"adapter.ranks": RANKS} if method in HETEROGENEOUS else {}),
                 **({"fraction-evaluate": 1.0} if personal else {})}
    _, rows, _ = run_local(tmp_path, **LM, **overrides)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["clients_aggregated"] == 3 and not r["rejected"] for r in rows[1:])
    for r in rows:
        assert math.isfinite(r["global_loss"]) and r["global_perplexity"] == pytest.approx(math.exp(r["global_loss"]))
    if personal:  # the server's model is the shared part with B = 0; what learns is each client's own model
        assert rows[2]["fed_loss"] < rows[1]["fed_loss"], f"{method}: the clients' own perplexity did not fall"
    else:
        assert rows[-1]["global_loss"] < rows[0]["global_loss"], f"{method}: held-out perplexity did not fall"
    assert _adapter_changed(tmp_path, overrides), f"{method}: the global adapter did not change"
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    generations = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 5 and all(g["finetuned"] for g in generations)
    assert (tmp_path / "generations.md").read_text().startswith("# Greedy generations")


def test_dp_sgd_on_the_causal_lm(tmp_path) -> None:
    overrides = {"method.name": "fedit", "privacy.mode": "sample", "privacy.noise-multiplier": 0.5,
                 "privacy.clip": 1.0, "train.lr": 0.02}
    _, rows, summary = run_local(tmp_path, **{**LM, **overrides})
    eps = [r["epsilon"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1] and summary["epsilon"] == eps[1]  # one accountant per client, carried across rounds
    assert all(math.isfinite(r["global_loss"]) for r in rows) and all(math.isfinite(r["train_loss"]) for r in rows[1:])
    assert _adapter_changed(tmp_path, overrides)


def test_one_novel_per_client_with_federated_perplexity(tmp_path) -> None:
    overrides = {"method.name": "fedit", "data.partition": "label", "num-server-rounds": 1, "fraction-evaluate": 1.0,
                 "data.max-eval-examples": 32}
    _, rows, _ = run_local(tmp_path, num_nodes=6, **{**LM, **overrides})
    assert rows[1]["clients_aggregated"] == 6
    assert rows[1]["fed_perplexity"] == pytest.approx(math.exp(rows[1]["fed_loss"]))


def test_instruction_data_federation(tmp_path) -> None:
    words = ["house", "letter", "sister", "garden", "morning", "dance", "horse", "ball", "card", "walk"]
    for split, n in (("train", 90), ("test", 12)):
        rows = [{"instruction": f"repeat the word {words[i % 10]} twice", "response": f"{words[i % 10]} " * 2}
                for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    _, rows, _ = run_local(out, **{**LM, "data.source": str(tmp_path), "data.format": "instruction",
                                   "train.lr": 0.01, "method.name": "fedit"})
    assert rows[-1]["global_loss"] < rows[0]["global_loss"]  # loss on the responses only
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in generations] == [f"repeat the word {w} twice" for w in words[:4]]

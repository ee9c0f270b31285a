"""Run config: Flower's flat keys map onto the dataclasses, bad keys and values fail naming the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from fedlora.config import ConfigError, FedLoraConfig, app_config_toml

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables -> dotted keys, as Flower builds ``context.run_config``."""
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def test_defaults() -> None:
    cfg = FedLoraConfig()
    assert cfg.run.num_server_rounds == 3
    assert cfg.run.fraction_train == 1.0
    assert cfg.run.seed == 42
    assert cfg.run.resume is False
    assert cfg.model.name == "tiny"
    assert cfg.adapter.rank == 8
    assert cfg.adapter.alpha == 16.0
    assert cfg.adapter.target_modules == "auto" and cfg.adapter.head == "auto"  # the task's defaults, resolved:
    resolved = FedLoraConfig.from_run_config({})
    assert resolved.adapter.targets() == ["query", "value"]
    assert resolved.adapter.heads() == ["classifier"]
    assert cfg.adapter.ranks == ""
    assert cfg.method.name == "fedit"
    assert cfg.data.partition == "dirichlet"
    assert cfg.train.lr == 5e-3
    cfg.validate()  # the defaults are valid
    assert resolved == cfg


def test_from_run_config_maps_dotted_and_dashed_keys_and_coerces() -> None:
    cfg = FedLoraConfig.from_run_config({
        "adapter.target-modules": "q_proj, v_proj",
        "num-server-rounds": 5,
        "train.lr": 1,
        "train.local-steps": "7",
        "adapter.rank": "8",
        "adapter.alpha": "4",
        "resume": "true",
        "method.name": "flora",
        "data.dirichlet-alpha": 0.5,
        "model.max-length": 32.0,
    })
    assert cfg.adapter.target_modules == "q_proj, v_proj"
    assert cfg.adapter.targets() == ["q_proj", "v_proj"]
    assert cfg.run.num_server_rounds == 5
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.train.local_steps == 7 and type(cfg.train.local_steps) is int
    assert cfg.adapter.rank == 8 and type(cfg.adapter.rank) is int
    assert cfg.adapter.alpha == 4.0 and type(cfg.adapter.alpha) is float
    assert cfg.run.resume is True
    assert cfg.method.name == "flora"
    assert cfg.data.dirichlet_alpha == 0.5
    assert cfg.model.max_length == 32 and type(cfg.model.max_length) is int
    # untouched keys keep their defaults
    assert cfg.train.batch_size == FedLoraConfig().train.batch_size


@pytest.mark.parametrize("text, want", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("0", False), (True, True), (False, False)])
def test_bool_coercion(text: Any, want: bool) -> None:
    assert FedLoraConfig.from_run_config({"resume": text}).run.resume is want


@pytest.mark.parametrize("key, known", [
    ("adapter.rnak", ["rank", "target-modules", "alpha"]),
    ("num-rounds", ["num-server-rounds", "fraction-train"]),
    ("train.learning-rate", ["lr", "local-steps"]),
])
def test_unknown_key_names_it_and_lists_the_known_keys(key: str, known: list[str]) -> None:
    with pytest.raises(ConfigError, match=re.escape(repr(key))) as err:
        FedLoraConfig.from_run_config({key: 1})
    for k in known:
        assert f"'{k}'" in str(err.value)


def test_unknown_section_names_the_key_and_the_sections() -> None:
    with pytest.raises(ConfigError, match="'adaptr.rank'") as err:
        FedLoraConfig.from_run_config({"adaptr.rank": 4})
    assert "'adapter'" in str(err.value) and "'train'" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("adapter.rank", "eight"),
    ("adapter.rank", 2.5),
    ("adapter.rank", True),
    ("train.lr", "fast"),
    ("train.lr", False),
    ("resume", "yes"),
    ("resume", 2),
    ("num-server-rounds", "3.5"),
])
def test_wrong_type_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        FedLoraConfig.from_run_config({key: value})


@pytest.mark.parametrize("key, value", [
    ("adapter.rank", 0),
    ("adapter.alpha", 0),
    ("adapter.dropout", 1.0),
    ("adapter.target-modules", " , "),
    ("fraction-train", 1.5),
    ("fraction-train", 0.0),
    ("fraction-evaluate", -0.1),
    ("num-server-rounds", 0),
    ("data.partition", "foo"),
    ("adapter.ranks", "4,x"),
    ("adapter.ranks", "4,0"),
    ("train.lr", 0),
    ("method.weighting", "median"),
])
def test_out_of_range_names_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        FedLoraConfig.from_run_config({key: value})


def test_to_run_config_round_trips() -> None:
    cfg = FedLoraConfig.from_run_config({
        "num-server-rounds": 9, "fraction-evaluate": 0.25, "resume": True, "output-dir": "runs/x",
        "adapter.rank": 4, "adapter.ranks": "2,4,8", "adapter.target-modules": "q_proj,v_proj",
        "adapter.head": "", "method.name": "flora", "data.partition": "iid", "train.lr": 0.1,
    })
    flat = cfg.to_run_config()
    assert flat["num-server-rounds"] == 9
    assert flat["adapter.target-modules"] == "q_proj,v_proj"
    assert all("_" not in k for k in flat)
    back = FedLoraConfig.from_run_config(flat)
    assert back == cfg
    assert back != FedLoraConfig()


def test_rank_for_cycles_through_the_ranks() -> None:
    cfg = FedLoraConfig.from_run_config({"adapter.ranks": "4,8", "method.name": "flora"})
    assert [cfg.adapter.rank_for(i) for i in range(3)] == [4, 8, 4]
    assert FedLoraConfig.from_run_config({"adapter.rank": 6}).adapter.rank_for(5) == 6  # no ranks: global rank


def test_pyproject_app_config_is_accepted() -> None:
    tomllib = pytest.importorskip("tomllib")  # stdlib from Python 3.11; the project supports 3.10
    with open(PYPROJECT, "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    flat = _flatten(table)
    assert "adapter.target-modules" in flat and "num-server-rounds" in flat  # flattened as Flower does
    back = FedLoraConfig.from_run_config(flat).to_run_config()
    for key, value in flat.items():
        assert back[key] == (value if value != "auto" else back[key]), key  # 'auto' resolves to the task's choice
    assert back["adapter.target-modules"] == "query,value" and back["adapter.head"] == "classifier"


def test_pyproject_app_config_is_generated_from_the_dataclasses() -> None:
    """One source of truth: the keys, defaults and help of [tool.flwr.app.config] are the dataclasses' (run
    `fedlora config --toml` and paste the table after changing a field or a method's Options)."""
    tomllib = pytest.importorskip("tomllib")
    text = PYPROJECT.read_text(encoding="utf-8")
    assert app_config_toml() in text, "pyproject.toml's [tool.flwr.app.config] is stale: run `fedlora config --toml`"
    with open(PYPROJECT, "rb") as f:
        flat = _flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    defaults = FedLoraConfig().to_run_config()
    assert flat == defaults  # same keys, same defaults, same types
    assert all(type(flat[k]) is type(v) for k, v in defaults.items())


def test_every_method_option_is_a_run_config_key_with_its_default() -> None:
    from fedlora.aggregation import aggregator_class, available

    flat = FedLoraConfig().to_run_config()
    for name in available():
        cls = aggregator_class(name)
        for f in dataclasses.fields(cls.Options):
            assert flat[f"method.{f.name.replace('_', '-')}"] == f.default, (name, f.name)
    with pytest.raises(ConfigError, match=r"method.fair-steps=-1 must be >= 0"):
        FedLoraConfig.from_run_config({"method.name": "lora_fair", "method.fair-steps": -1})
    with pytest.raises(ConfigError, match=r"method.flex-svd='fast' is not valid"):
        FedLoraConfig.from_run_config({"method.name": "flexlora", "method.flex-svd": "fast"})


def test_per_client_ranks_with_a_one_rank_method_fail_at_start() -> None:
    """`fedlora run --method fedit --set adapter.ranks=2,4` used to pass validation and fail in the ServerApp."""
    with pytest.raises(ConfigError, match=r"adapter.ranks='2,4' gives clients different ranks, but "
                                          r"method.name='fedit' needs one rank; use one of \['flexlora', 'flora', "
                                          r"'hetlora'\] or clear adapter.ranks"):
        FedLoraConfig.from_run_config({"method.name": "fedit", "adapter.ranks": "2,4"})
    with pytest.raises(ConfigError, match=r"exceeds adapter.rank=8.*set adapter.rank=16"):
        FedLoraConfig.from_run_config({"method.name": "flexlora", "adapter.ranks": "4,16"})
    FedLoraConfig.from_run_config({"method.name": "flora", "adapter.ranks": "4,16"})  # fresh each round: any rank


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"method.name='fedavg'.*fedsvd"):
        FedLoraConfig.from_run_config({"method.name": "fedavg"})

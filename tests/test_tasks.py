"""Tasks as plug-ins: the registry, defaults per model type, the shared data logic, seeding of local training,
and start-up checks that fail before round 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import fedlora.models
from fedlora import naming
from fedlora.adapters import adapter_state
from fedlora.client import fit
from fedlora.components import make_aggregator
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.data import builtin_path
from fedlora.server import initial_state
from fedlora.tasks import Task, available_tasks, get_task, preflight, task_class
from fedlora.tasks import base as tasks_base
from fedlora.tasks.classification import ClassificationTask

SMALL = {"model.max-length": 32, "adapter.rank": 4, "train.batch-size": 4, "train.local-steps": 2}


def _cfg(**kw) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({**SMALL, **kw})


def test_registry_knows_both_tasks_and_names_the_choices() -> None:
    assert {"classification", "causal_lm"} <= set(available_tasks())
    assert isinstance(get_task(_cfg()), ClassificationTask)
    with pytest.raises(ConfigError, match=r"model.task='ner' must be one of \['causal_lm', 'classification'"):
        FedLoraConfig.from_run_config({"model.task": "ner"})


def test_a_third_task_is_one_class_and_one_register_line(monkeypatch) -> None:
    monkeypatch.setattr(tasks_base, "_REGISTRY", dict(tasks_base._REGISTRY))

    @tasks_base.register
    class TopicTask(ClassificationTask):  # e.g. a task with its own targets, head and partition scheme
        name = "topic"
        default_targets = {"*": "query,key,value"}
        default_head = "classifier,bert.pooler.dense"

    cfg = FedLoraConfig.from_run_config({"model.task": "topic"})
    assert isinstance(get_task(cfg), TopicTask)
    assert cfg.adapter.targets() == ["query", "key", "value"] and cfg.adapter.heads()[1] == "bert.pooler.dense"
    with pytest.raises(ValueError, match="registered twice"):
        tasks_base.register(TopicTask)


@pytest.mark.parametrize("task, targets, head", [("classification", ["query", "value"], ["classifier"]),
                                                 ("causal_lm", ["q_proj", "k_proj", "v_proj", "o_proj"], [])])
def test_auto_targets_and_head_come_from_the_task_and_model_type(task, targets, head, tmp_path) -> None:
    cfg = FedLoraConfig.from_run_config({"model.task": task})
    assert cfg.adapter.targets() == targets and cfg.adapter.heads() == head
    kept = FedLoraConfig.from_run_config({"model.task": task, "adapter.target-modules": "dense"})
    assert kept.adapter.targets() == ["dense"]  # an explicit value is never replaced
    (tmp_path / "config.json").write_text('{"model_type": "distilbert"}')
    assert task_class("classification").model_type(str(tmp_path)) == "distilbert"
    if task == "classification":
        folder = FedLoraConfig.from_run_config({"model.name": str(tmp_path)})
        assert folder.adapter.targets() == ["q_lin", "v_lin"]


def test_label_partition_is_a_causal_lm_scheme_only() -> None:
    with pytest.raises(ConfigError, match="data.partition='label' is not a scheme of model.task='classification'"):
        FedLoraConfig.from_run_config({"data.partition": "label"})
    cfg = FedLoraConfig.from_run_config({"model.task": "causal_lm", "data.partition": "label"})
    parts = get_task(cfg).partitions("train", 6)
    labels = get_task(cfg).dataset("train").labels
    assert [{labels[i] for i in p} for p in parts] == [{k} for k in range(6)]  # one novel per client


def test_client_partitions_are_disjoint_cover_and_are_cached() -> None:
    task = get_task(_cfg(**{"data.partition": "iid"}))
    parts = task.partitions("train", 5)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(task.dataset("train"))))
    assert task.partitions("train", 5) is parts  # computed once per process
    n, enc, labels = task.client_data("train", 2, 5)
    assert n == len(parts[2]) == len(labels) == enc["input_ids"].shape[0]
    assert task.client_data("train", 2, 5)[1] is enc


# -- bug: every client in every round drew the same dropout masks ------------------------------------------
def test_building_a_model_leaves_the_global_rng_alone() -> None:
    """load_model used to reseed the global RNG on every build: local training then drew the same dropout
    masks on every client in every round."""
    for task in ("classification", "causal_lm"):
        t = get_task(_cfg(**{"model.task": task}))
        torch.manual_seed(5)
        before = torch.get_rng_state()
        t.build_model("lora", 4)
        assert torch.equal(torch.get_rng_state(), before), task


def _one_example_folder(tmp_path: Path) -> Path:
    """One training example: every client's batch is that example, so only dropout can make losses differ."""
    src = builtin_path("austen")
    tmp_path.mkdir(parents=True, exist_ok=True)
    first = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (tmp_path / "train.jsonl").write_text(first + "\n", encoding="utf-8")
    shutil.copy(src / "labels.json", tmp_path / "labels.json")
    return tmp_path


def test_dropout_is_seeded_per_client_and_round_and_reproducible(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(fedlora.models, "TINY", {**fedlora.models.TINY, "hidden_dropout_prob": 0.3})
    cfg = _cfg(**{"data.source": str(_one_example_folder(tmp_path)), "train.local-steps": 1})
    agg = make_aggregator(cfg)
    payload = initial_state(cfg, agg)

    def first_loss(pid: int, rnd: int) -> float:
        torch.manual_seed(0)  # whatever the global RNG holds, the result depends on (seed, round, client) only
        return fit(cfg, payload, pid, 1, rnd, agg).metrics["first_loss"]

    a = first_loss(0, 1)
    assert first_loss(0, 1) == a  # reproducible
    others = {first_loss(1, 1), first_loss(2, 1), first_loss(0, 2)}
    assert a not in others and len(others) == 3  # other clients and other rounds draw other masks


def test_model_without_dropout_gives_the_same_loss_for_every_client(tmp_path) -> None:
    """The control for the test above: with dropout 0 (the tiny default) one example gives one loss."""
    cfg = _cfg(**{"data.source": str(_one_example_folder(tmp_path)), "train.local-steps": 1})
    agg = make_aggregator(cfg)
    payload = initial_state(cfg, agg)
    losses = {fit(cfg, payload, pid, 1, 1, agg).metrics["first_loss"] for pid in range(3)}
    assert len(losses) == 1


# -- bug: a run whose data cannot be partitioned failed in every client of every round --------------------
def test_preflight_stops_an_unpartitionable_run_with_advice_that_works() -> None:
    cfg = _cfg()  # default Dirichlet(1.0) split, min-partition-size 10: 1000 clients get 11.4 examples on average
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 1000)
    msg = str(err.value)
    assert "1000 clients" in msg and "data.min-partition-size=10" in msg and "mean of 11.4" in msg
    assert "raise data.dirichlet-alpha" not in msg  # alpha is already 1.0: that advice would be wrong
    size = int(msg.split("lower data.min-partition-size to ")[1].split()[0])
    assert 0 < size < 10
    fixed = _cfg(**{"data.min-partition-size": size})
    preflight(fixed, 1000)  # the advice, followed, works
    preflight(_cfg(**{"data.partition": "iid"}), 1000)
    preflight(cfg, 4)


# -- the task owns the loss: base gradients for Fed-SB's init work for every task -------------------------
def test_fed_sb_gradient_init_works_for_the_causal_lm_too() -> None:
    cfg = _cfg(**{"model.task": "causal_lm", "method.name": "fed_sb", "method.sb-init": "gradient",
                  "method.sb-init-examples": 8})
    state = initial_state(cfg, make_aggregator(cfg))
    ortho = _cfg(**{"model.task": "causal_lm", "method.name": "fed_sb"})
    plain = initial_state(ortho, make_aggregator(ortho))
    r_keys = [k for k in state if (s := naming.split(k)) and s[1] == "R"]
    assert r_keys and all(state[k].abs().sum() > 0 for k in r_keys)  # diag(S) / s, not the zero R of the plain init
    assert all(plain[k].abs().sum() == 0 for k in r_keys)


def test_base_gradients_leave_the_model_untouched() -> None:
    task = get_task(_cfg())
    model = task.build_model("lora", 4)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    grads = task.base_gradients(model, 8)
    assert grads and all(g.shape == model.get_submodule(p).base.weight.shape for p, g in grads.items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())
    assert not model.training


def test_task_is_an_abstract_base() -> None:
    with pytest.raises(TypeError):
        Task(_cfg())  # type: ignore[abstract]


@pytest.mark.parametrize("argv, says", [
    (["--num-clients", "1000"], "lower data.min-partition-size to"),  # used to fail in every client, exit 0
    (["--method", "fedit", "--set", "adapter.ranks=2,4"], "adapter.ranks='2,4' gives clients different ranks"),
])
def test_runs_that_cannot_work_stop_at_start_with_one_message(argv, says, capsys, tmp_path) -> None:
    from fedlora.cli import main

    code = main(["run", "--model", "tiny", "--rounds", "1", "--output", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started

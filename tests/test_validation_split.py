"""data.validation-fraction: a seeded per-class share of train stands in for test, so tuning never reads test."""

from __future__ import annotations

from collections import Counter

import pytest

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.tasks import base as tasks_base
from fedlora.tasks import get_task
from fedlora.tasks.base import validation_indices


def _task(**kw):
    return get_task(FedLoraConfig.from_run_config({"model.max-length": 32, **kw}))


def test_validation_is_carved_from_train_per_class_and_test_is_never_read(monkeypatch) -> None:
    monkeypatch.setattr(tasks_base, "_DATASETS", {})
    full = _task().dataset("train")
    task = _task(**{"data.validation-fraction": 0.2, "seed": 3})
    read = []
    original = type(task).load_split
    monkeypatch.setattr(type(task), "load_split", lambda self, split: read.append(split) or original(self, split))
    train, val = task.dataset("train"), task.dataset("test")
    assert set(read) == {"train"}  # the test split is not even loaded
    assert len(train) + len(val) == len(full)
    assert Counter(train.texts) + Counter(val.texts) == Counter(full.texts)
    per_class, held = Counter(full.labels), Counter(val.labels)
    for y, n in per_class.items():  # stratified: every class gives its own share
        assert abs(held[y] - 0.2 * n) <= 1
    # the server's held-out set and the clients' evaluation data are validation examples
    server = task.server_dataset()
    assert Counter(server.texts) <= Counter(val.texts)
    client = task.client_dataset("test", 1, 4)
    assert Counter(client.texts) <= Counter(val.texts)
    assert Counter(task.client_dataset("train", 1, 4).texts) <= Counter(train.texts)


def test_the_carve_out_is_seeded_and_off_by_default(monkeypatch) -> None:
    labels = [i % 3 for i in range(300)]
    a, b = validation_indices(labels, 0.1, seed=1), validation_indices(labels, 0.1, seed=1)
    assert a == b and len(a) == 30 and validation_indices(labels, 0.1, seed=2) != a
    # a class of one stays in train; a class of two gives one example even when the share rounds to none
    (held,) = validation_indices([0, 1, 1], 0.01, seed=0)
    assert held in (1, 2)
    monkeypatch.setattr(tasks_base, "_DATASETS", {})
    off = _task()
    assert len(off.dataset("test")) != len(_task(**{"data.validation-fraction": 0.1}).dataset("test"))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_a_bad_fraction_is_refused_naming_the_key(bad) -> None:
    with pytest.raises(ConfigError, match=r"data.validation-fraction.*\[0, 1\)"):
        FedLoraConfig.from_run_config({"data.validation-fraction": bad})

"""`fedlora compare` end to end on the tiny model: the table's numbers come from the runs, reuse, ranks, errors."""

from __future__ import annotations

import csv
import json

import pytest

from fedlora import cli
from simulations import compare

FAST = ["train.local-steps=2", "train.batch-size=8", "model.max-length=32", "data.max-eval-examples=64",
        "adapter.rank=4"]
METHODS = ["fedit", "fed_sb", "flexlora", "fedit+int8"]


def run_compare(out, *extra: str) -> int:
    argv = ["compare", "--methods", ",".join(METHODS), "--rounds", "2", "--num-clients", "3", "--ranks", "1,2",
            "--partition", "dirichlet", "--alpha", "0.5", "--output", str(out), *extra]
    for pair in FAST:
        argv += ["--set", pair]
    return cli.main(argv)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert run_compare(out) == 0
    return out


def read_rows(out) -> list[dict]:
    with open(out / "compare.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_table_rows_come_from_each_methods_metrics(compared):
    rows = read_rows(compared)
    assert list(rows[0]) == compare.COLUMNS
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        hist = [json.loads(line) for line in (compared / r["method"] / "metrics.jsonl").read_text().splitlines()]
        trained = [h for h in hist if h["round"] > 0]
        assert len(trained) == int(r["rounds"]) == 2
        total = sum(h["bytes_down"] + h["bytes_up"] for h in trained)
        assert int(r["bytes_total"]) == total > 0
        assert float(r["bytes_up_per_round"]) == pytest.approx(sum(h["bytes_up"] for h in trained) / 2)
        assert float(r["final_accuracy"]) == pytest.approx(hist[-1]["global_accuracy"])
        assert float(r["best_accuracy"]) == pytest.approx(max(h["global_accuracy"] for h in hist))
        assert float(r["aggregate_ms_per_round"]) > 0
        per_round = [float(x) for x in r["exactness_per_round"].split(";")]
        assert per_round == pytest.approx([h["exactness"] for h in trained], rel=1e-3)
        assert r["partition"] == "dirichlet(0.5)"


def test_exactness_column_separates_exact_and_inexact_methods(compared):
    worst = {r["method"]: float(r["exactness_max"]) for r in read_rows(compared)}
    # Fed-SB averages R between shared frozen factors, and FlexLoRA keeps every direction while sum r_k <= r_max
    # (ranks 1, 2, 1 under r_max 4): both exact. FedIT's mean(B) mean(A) differs from mean(B A) as soon as the
    # clients' A differ (after round 1).
    assert worst["fed_sb"] < 1e-5 and worst["flexlora"] < 1e-5
    assert worst["fedit"] > 1e-3


def test_a_compressed_entry_runs_its_method_in_that_codec(compared):
    rows = {r["method"]: r for r in read_rows(compared)}
    ran = json.loads((compared / "fedit+int8" / "run.json").read_text())["run_config"]
    assert ran["method.name"] == "fedit" and ran["wire.upload"] == ran["wire.download"] == "int8"
    assert rows["fedit"]["wire_error_max"] == ""  # float32: nothing added
    assert 1e-4 < float(rows["fedit+int8"]["wire_error_max"]) < 0.05
    assert float(rows["fedit+int8"]["bytes_up_per_round"]) < 0.3 * float(rows["fedit"]["bytes_up_per_round"])
    with pytest.raises(Exception, match=r"after '\+' comes a wire codec .* or a server optimiser"):
        compare.method_config({}, "fedit+fp8", compared / "x", "")
    both = compare.method_config({}, "ffa+adam+bfloat16", compared / "x", "")
    assert both["method.server-opt"] == "adam" and both["wire.upload"] == "bfloat16"


def test_fed_sb_uploads_only_r_and_head(compared):
    up = {r["method"]: float(r["bytes_up_per_round"]) for r in read_rows(compared)}
    assert up["fed_sb"] < up["fedit"] / 2


def test_ranks_go_only_to_heterogeneous_methods(compared):
    ran = {m: json.loads((compared / m / "run.json").read_text())["run_config"] for m in METHODS}
    assert ran["flexlora"]["adapter.ranks"] == "1,2"
    assert ran["fedit"]["adapter.ranks"] == "" and ran["fed_sb"]["adapter.ranks"] == ""
    assert all(cfg["data.partition"] == "dirichlet" and cfg["data.dirichlet-alpha"] == 0.5 for cfg in ran.values())


def test_outputs_written(compared):
    md = (compared / "compare.md").read_text().splitlines()
    assert md[0].startswith("model tiny, 3 clients, 2 rounds, partition dirichlet(0.5)")
    assert md[2].startswith("| method | final acc | best acc | final loss | down / round")
    assert [line.split("|")[1].strip() for line in md[4:]] == METHODS
    png = (compared / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_second_call_reuses_finished_methods(compared, capsys):
    stamps = {m: (compared / m / "summary.json").stat().st_mtime_ns for m in METHODS}
    assert run_compare(compared) == 0
    assert "reused" in capsys.readouterr().out
    assert {m: (compared / m / "summary.json").stat().st_mtime_ns for m in METHODS} == stamps


def test_unknown_method_is_a_config_error(tmp_path, capsys):
    assert cli.main(["compare", "--methods", "fedit,fedavgg", "--output", str(tmp_path)]) == 2
    assert "fedavgg" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # validated before anything ran


def test_a_run_from_before_a_new_config_key_is_reused_when_the_key_is_at_its_default(compared):
    from simulations.cells import finished

    cfg = json.loads((compared / "fedit" / "run.json").read_text())["run_config"]
    old = {k: v for k, v in cfg.items() if k != "keep-checkpoints"}  # as if written before that key existed
    run_json = json.loads((compared / "fedit" / "run.json").read_text())
    (compared / "fedit" / "run.json").write_text(json.dumps({**run_json, "run_config": old}))
    try:
        assert finished(compared / "fedit", cfg) is not None
        assert finished(compared / "fedit", {**cfg, "keep-checkpoints": 5}) is None
    finally:
        (compared / "fedit" / "run.json").write_text(json.dumps(run_json))


def test_a_started_run_removes_the_previous_summary(tmp_path):
    """A run interrupted in a folder that held a finished run must not look finished (its summary is stale)."""
    from fedlora.config import FedLoraConfig
    from fedlora.report import Reporter

    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 3}))
    Reporter(FedLoraConfig(), tmp_path, printer=lambda *_: None).start()
    assert not (tmp_path / "summary.json").exists()

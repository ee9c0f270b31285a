"""simulations.privacy_sweep end to end on the tiny model: cells, table, CSV, plot, and resume.

Both tests share one sweep folder: the no-DP grid runs first, the full grid then reuses its cells and adds the
DP ones, and a second invocation of the full grid must re-run nothing. The seeds test starts from a copy of one
of its single-seed cells.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics

import pytest

from fedlora.cli import parse_overrides
from fedlora.config import ConfigError
from simulations import privacy_sweep
from simulations.cells import finished

FAST = ["train.local-steps=2", "train.batch-size=8", "model.max-length=32", "data.max-eval-examples=64",
        "fraction-evaluate=0", "adapter.rank=4", "data.partition=iid"]
METHODS = ["fedit", "fed_sb"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("privacy-sweep")


def sweep(out, epsilons: str, *extra: str, methods: list[str] = METHODS) -> int:
    argv = ["--epsilons", epsilons, "--methods", ",".join(methods), *extra, "--rounds", "1", "--num-clients", "2",
            "--output", str(out)]
    for pair in FAST:
        argv += ["--set", pair]
    return privacy_sweep.main(argv)


def check_outputs(out, epsilons: list[str]) -> list[dict]:
    expected = [(m, e) for m in METHODS for e in epsilons]
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == privacy_sweep.COLUMNS
    assert [(r["method"], r["epsilon"]) for r in rows] == expected
    for r in rows:
        for key in ("final_accuracy", "best_accuracy"):
            assert 0.0 <= float(r[key]) <= 1.0, (r, key)
        assert float(r["final_accuracy"]) <= float(r["best_accuracy"])
        assert math.isfinite(float(r["final_loss"])) and float(r["wall_seconds"]) > 0
        assert int(r["bytes_up_per_round"]) > 0, f"{r['method']} eps={r['epsilon']}: no client update aggregated"
        if r["epsilon"] == "inf":
            assert r["epsilon_spent"] == ""
        summary = json.loads((out / f"{r['method']}-eps{r['epsilon']}" / "summary.json").read_text())
        assert summary["method"] == r["method"] and summary["rounds"] == 1
        assert float(r["final_accuracy"]) == pytest.approx(summary["final_accuracy"])

    md = (out / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| method | epsilon | n | epsilon spent | final acc")
    assert md[1].startswith("|---")
    assert [tuple(c.strip() for c in line.split("|")[1:3]) for line in md[2:]] == expected

    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    return rows


def check_resume(out, epsilons: str, capsys) -> None:
    cells = [out / f"{m}-eps{e}" / "summary.json" for m in METHODS for e in epsilons.split(",")]
    mtimes = [c.stat().st_mtime_ns for c in cells]
    before = (out / "sweep.csv").read_text()
    capsys.readouterr()
    assert sweep(out, epsilons) == 0
    printed = capsys.readouterr().out
    assert printed.count("... reused") == len(cells) and "... running" not in printed
    assert [c.stat().st_mtime_ns for c in cells] == mtimes
    assert (out / "sweep.csv").read_text() == before


def test_sweep_without_dp(sweep_dir, capsys):
    assert sweep(sweep_dir, "inf") == 0
    printed = capsys.readouterr().out
    assert "[1/2] fedit eps=inf ... running" in printed and "[2/2] fed_sb eps=inf ... final acc" in printed
    check_outputs(sweep_dir, ["inf"])
    check_resume(sweep_dir, "inf", capsys)
    # A cell is reused only for the same config: other rounds or another --set value re-run it.
    out = sweep_dir / "fedit-epsinf"
    base = {"num-server-rounds": 1, **parse_overrides(FAST)}
    assert finished(out, privacy_sweep.cell_config(base, "fedit", math.inf, out)) is not None
    for change in ({"num-server-rounds": 2}, {"adapter.rank": 8}, {"seed": 7}):
        cfg = privacy_sweep.cell_config({**base, **change}, "fedit", math.inf, out)
        assert finished(out, cfg) is None, change


def test_sweep_with_dp(sweep_dir, capsys):
    """Needs DP-SGD in the client (privacy.mode=sample) and the spent epsilon in summary.json."""
    assert sweep(sweep_dir, "8,inf") == 0
    rows = check_outputs(sweep_dir, ["8", "inf"])
    for r in rows:
        if r["epsilon"] == "8":
            assert r["epsilon_spent"], f"{r['method']} eps=8: summary.json has no 'epsilon'"
            assert 0.0 < float(r["epsilon_spent"]) <= 8.0 + 0.1, r
            run = json.loads((sweep_dir / f"{r['method']}-eps8" / "run.json").read_text())["run_config"]
            assert run["privacy.mode"] == "sample" and run["privacy.target-epsilon"] == 8.0
    check_resume(sweep_dir, "8,inf", capsys)


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_seeds_per_cell_reused_seed_by_seed_and_aggregated(sweep_dir, tmp_path, capsys):
    """--seeds 42,1 over a copy of a single-seed cell (seed 42, the layout from before seeds) runs seed 1 only;
    sweep-mean.csv holds mean, std (ddof 1) and n of the per-seed rows. (Adding a seed to a seeded folder runs
    only that seed: tests/test_compare.py, through the same simulations.cells.run_jobs.)"""
    out = tmp_path / "seeded"
    shutil.copytree(sweep_dir / "fedit-epsinf", out / "fedit-epsinf")
    capsys.readouterr()
    assert sweep(out, "inf", "--seeds", "42,1", methods=["fedit"]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] fedit eps=inf seed=42 ... reused" in printed and "[2/2] fedit eps=inf seed=1 ... running" in printed
    assert [p.name for p in (out / "fedit-epsinf").glob("seed-*")] == ["seed-1"]

    rows = read_csv(out / "sweep.csv")
    assert [r["seed"] for r in rows] == ["42", "1"]
    (mean,) = read_csv(out / "sweep-mean.csv")
    assert list(mean) == privacy_sweep.MEAN_COLUMNS
    assert (mean["method"], mean["epsilon"], mean["n"], mean["seeds"]) == ("fedit", "inf", "2", "42;1")
    for col in privacy_sweep.SPREAD:
        values = [float(r[col]) for r in rows]
        assert float(mean[f"{col}_mean"]) == pytest.approx(statistics.fmean(values)), col
        assert float(mean[f"{col}_std"]) == pytest.approx(statistics.stdev(values)), col
    assert float(mean["bytes_up_per_round"]) == float(rows[0]["bytes_up_per_round"])
    line = (out / "sweep.md").read_text().splitlines()[2]
    assert f"| fedit | inf | 2 | - | {float(mean['final_accuracy_mean']):.3f} \u00b1 " in line
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_epsilons_fail_before_any_cell(tmp_path, capsys):
    assert privacy_sweep.main(["--epsilons", "3,zero", "--output", str(tmp_path / "s")]) == 2
    assert "--epsilons" in capsys.readouterr().err
    assert privacy_sweep.main(["--set", "privacy.mode=none", "--epsilons", "3", "--output", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_tune_lr_tunes_each_method_once_under_dp_at_one_epsilon_and_once_without(tmp_path):
    out = tmp_path / "tuned"
    assert sweep(out, "3,8,inf", "--tune-lr", "1e-4,3e-2", "--tune-epsilon", "8") == 0
    tried = read_csv(out / "tuning.csv")
    assert [(r["cell"], r["tuned_on"], float(r["lr"])) for r in tried] == [
        (f"{m} {kind}", f"{m} eps={eps}", lr) for kind, eps in (("DP", "8"), ("no DP", "inf")) for m in METHODS
        for lr in (1e-4, 3e-2)]
    rows = read_csv(out / "sweep.csv")
    for m in METHODS:
        pick = {kind: float(r["lr"]) for r in tried for kind in ("DP", "no DP")
                if r["cell"] == f"{m} {kind}" and r["chosen"] == "True"}
        assert [(r["epsilon"], float(r["lr"])) for r in rows if r["method"] == m] == [
            ("3", pick["DP"]), ("8", pick["DP"]), ("inf", pick["no DP"])]  # eps 3 runs at eps 8's pick
        tune = json.loads((out / f"{m}-eps8" / "tune" / f"lr-{pick['DP']:g}" / "run.json").read_text())["run_config"]
        assert tune["data.validation-fraction"] == 0.15 and tune["privacy.target-epsilon"] == 8.0
        plain = json.loads((out / f"{m}-epsinf" / "tune" / "lr-0.03" / "run.json").read_text())["run_config"]
        assert plain["privacy.mode"] == "none" and plain["data.validation-fraction"] == 0.15
        assert not (out / f"{m}-eps3" / "tune").exists()
    for bad in ("3", "inf"):  # not one of --epsilons; or not a DP one
        assert sweep(tmp_path / "bad", "8,inf", "--tune-lr", "1e-4,3e-2", "--tune-epsilon", bad) == 2
    assert not (tmp_path / "bad").exists()


def test_client_mode_runs_dp_fedavg_cells_with_the_client_presets(tmp_path, capsys):
    """--mode client: the finite-epsilon cells run DP-FedAvg on the server (clip and pre-clip norm logged every round,
    the accountant's epsilon within budget), with the client presets (a share of many clients a round, uniform
    weights: DP-FedAvg's z S / m assumes them) in every cell, the no-DP one included so that it differs only in DP."""
    out = tmp_path / "client"
    assert sweep(out, "8,inf", "--mode", "client", methods=["fedit"]) == 0
    dp = json.loads((out / "fedit-eps8" / "run.json").read_text())["run_config"]
    plain = json.loads((out / "fedit-epsinf" / "run.json").read_text())["run_config"]
    assert dp["privacy.mode"] == "client" and dp["privacy.target-epsilon"] == 8.0
    assert plain["privacy.mode"] == "none"
    tiny = privacy_sweep.CLIENT_PRESETS["tiny"]["overrides"]
    for run in (dp, plain):
        assert run["method.weighting"] == "uniform" and run["fraction-train"] == tiny["fraction-train"]
    (row,) = [r for r in read_csv(out / "sweep.csv") if r["epsilon"] == "8"]
    assert 0.0 < float(row["epsilon_spent"]) <= 8.0 + 0.1
    rounds = [json.loads(line) for line in (out / "fedit-eps8" / "metrics.jsonl").read_text().splitlines()][1:]
    assert rounds and all(r["clip"] == dp["privacy.clip"] and r["update_norm_median"] > 0 for r in rounds)
    assert all(r["clients_aggregated"] == 1 for r in rounds)  # 2 clients, fraction-train 0.5
    # The mode is one thing: --mode and --set privacy.mode must agree ('none' is refused: test_bad_epsilons_fail_...).
    capsys.readouterr()
    assert sweep(tmp_path / "bad", "8", "--mode", "client", "--set", "privacy.mode=sample") == 2
    assert "--mode client and --set privacy.mode=sample disagree" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("text", "why"), [("3,zero", "'zero' is not a number"), ("8,8", "epsilon 8 appears twice"),
                                           ("0,8", "'0' must be > 0"), (" , ", "is empty")])
def test_bad_epsilons_name_the_flag_and_why(text, why):
    with pytest.raises(ConfigError) as e:
        privacy_sweep.parse_epsilons(text)
    assert str(e.value).startswith("--epsilons") and why in str(e.value) and "1,3,8,inf" in str(e.value)
    assert privacy_sweep.parse_epsilons("1, 3,inf") == [1.0, 3.0, math.inf]

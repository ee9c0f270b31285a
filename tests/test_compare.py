"""`fedlora compare` end to end on the tiny model: the table's numbers come from the runs, reuse, ranks, errors,
and --seeds (per-seed folders, mean +- std, reuse seed by seed)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import pytest

from fedlora import cli
from simulations import compare

FAST = ["train.local-steps=2", "train.batch-size=8", "model.max-length=32", "data.max-eval-examples=64",
        "adapter.rank=4"]
METHODS = ["fedit", "fed_sb", "flexlora", "fedit+int8", "centralised"]


def run_compare(out, *extra: str, methods: list[str] = METHODS) -> int:
    argv = ["compare", "--methods", ",".join(methods), "--rounds", "2", "--num-clients", "3", "--ranks", "1,2",
            "--partition", "dirichlet", "--alpha", "0.5", "--output", str(out), *extra]
    for pair in FAST:
        argv += ["--set", pair]
    return cli.main(argv)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    assert run_compare(out) == 0
    return out


def read_rows(out, name: str = "compare.csv") -> list[dict]:
    with open(out / name, newline="") as f:
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


def test_the_centralised_reference_is_one_client_on_all_data_for_the_same_total_steps(compared):
    fed = json.loads((compared / "fedit" / "run.json").read_text())["run_config"]
    ref = json.loads((compared / "centralised" / "run.json").read_text())["run_config"]
    assert ref["method.name"] == "fedit" and ref["min-nodes"] == 1
    assert ref["train.local-steps"] == 3 * fed["train.local-steps"]  # 3 clients' steps a round, one client
    hist = [json.loads(line) for line in (compared / "centralised" / "metrics.jsonl").read_text().splitlines()]
    assert all(h["clients_sampled"] == 1 for h in hist[1:]) and len(hist) == 3


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
    assert md[0].endswith(", seed 42")
    assert md[2].startswith("| method | n | final acc | best acc | final loss | down / round")
    assert [line.split("|")[1].strip() for line in md[4:]] == METHODS
    assert "\u00b1" not in "\n".join(md)  # one seed: no spread to show
    png = (compared / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Without --seeds: one run per method in <method>/ (the layout from before seeds), n = 1, std left empty.
    assert not list(compared.glob("*/seed-*"))
    means = read_rows(compared, "compare-mean.csv")
    assert list(means[0]) == compare.MEAN_COLUMNS
    for mean, r in zip(means, read_rows(compared), strict=True):
        assert (mean["method"], mean["n"], mean["seeds"], r["seed"]) == (r["method"], "1", "42", "42")
        assert float(mean["final_accuracy_mean"]) == pytest.approx(float(r["final_accuracy"]))
        assert mean["final_accuracy_std"] == ""


@pytest.mark.parametrize("n", [1, 10, 13, 41, 160])
def test_every_plotted_method_gets_its_own_line_style(n):
    """matplotlib's colour cycle has 10 colours: with 12 entries FedIT and FedIT + AvgM were the same blue line."""
    styles = [tuple(sorted(s.items())) for s in compare.line_styles(n)]
    assert len(set(styles)) == n
    first = compare.line_styles(n)[:10]  # the first ten as before: colours C0..C9, solid lines, round markers
    assert first == [{"color": f"C{i}", "linestyle": "-", "marker": "o"} for i in range(len(first))]


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


SEEDED = ["fedit", "fed_sb"]


@pytest.fixture(scope="module")
def seeded(compared, tmp_path_factory):
    """``--seeds 42,7`` for two methods in a folder holding their single-seed runs of ``compared`` (seed 42, the
    old ``<method>/`` layout, copied): seed 42 is reused from there and only seed 7 runs."""
    out = tmp_path_factory.mktemp("compare-seeds")
    for m in SEEDED:
        shutil.copytree(compared / m, out / m)
    assert run_compare(out, "--seeds", "42,7", methods=SEEDED) == 0
    return out


def test_seeds_run_into_per_seed_folders_and_reuse_an_old_single_seed_run(seeded, compared):
    for m in SEEDED:
        assert not (seeded / m / "seed-42").exists()  # reused from <method>/ itself
        assert (seeded / m / "summary.json").stat().st_mtime_ns == (compared / m / "summary.json").stat().st_mtime_ns
        ran = json.loads((seeded / m / "seed-7" / "run.json").read_text())["run_config"]
        assert ran["seed"] == 7 and ran["output-dir"] == str(seeded / m / "seed-7")


def test_seeds_csv_aggregates_the_per_seed_rows(seeded):
    rows = read_rows(seeded)
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in SEEDED for s in ("42", "7")]
    for r in rows:
        folder = seeded / r["method"] / ("" if r["seed"] == "42" else f"seed-{r['seed']}")
        assert float(r["final_accuracy"]) == pytest.approx(json.loads((folder / "summary.json").read_text())
                                                           ["final_accuracy"])
    means = read_rows(seeded, "compare-mean.csv")
    assert [(m["method"], m["n"], m["seeds"]) for m in means] == [(m, "2", "42;7") for m in SEEDED]
    for mean in means:
        mine = [r for r in rows if r["method"] == mean["method"]]
        for col in compare.SPREAD:
            if col == "client_accuracy":  # no federated evaluation in this comparison: no value, no mean
                assert mean[f"{col}_mean"] == mean[f"{col}_std"] == ""
                continue
            values = [float(r[col]) for r in mine]
            assert float(mean[f"{col}_mean"]) == pytest.approx(statistics.fmean(values)), col
            assert float(mean[f"{col}_std"]) == pytest.approx(statistics.stdev(values)), col  # ddof = 1
        assert float(mean["bytes_total"]) == float(mine[0]["bytes_total"]) == float(mine[1]["bytes_total"])


def test_seeds_markdown_shows_mean_pm_std_and_the_spread_reading(seeded):
    md = (seeded / "compare.md").read_text().splitlines()
    assert md[0].endswith(", seeds 42,7")
    means = {m["method"]: m for m in read_rows(seeded, "compare-mean.csv")}
    for line in md[4:6]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        mean = means[cells[0]]
        assert cells[1] == "2"
        assert cells[2] == f"{float(mean['final_accuracy_mean']):.3f} \u00b1 {float(mean['final_accuracy_std']):.3f}"
    assert md[-1].startswith("Best final acc: ") and "within one std of it:" in md[-1]
    png = (seeded / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_adding_a_seed_runs_only_that_seed(seeded, capsys):
    finished = [seeded / "fedit" / "summary.json", seeded / "fedit" / "seed-7" / "summary.json"]
    stamps = [p.stat().st_mtime_ns for p in finished]
    capsys.readouterr()
    assert run_compare(seeded, "--seeds", "42,7,8", methods=["fedit"]) == 0
    printed = capsys.readouterr().out
    assert "[1/3] fedit seed=42 ... reused" in printed and "[2/3] fedit seed=7 ... reused" in printed
    assert "[3/3] fedit seed=8 ... running" in printed and printed.count("... running") == 1
    assert [p.stat().st_mtime_ns for p in finished] == stamps
    assert read_rows(seeded, "compare-mean.csv")[0]["n"] == "3"


@pytest.mark.parametrize("command", ["compare", "sweep"])
@pytest.mark.parametrize(("seeds", "why"), [("a,b", "'a' is not a whole number"), ("", "is empty"),
                                            (" , ", "is empty"), ("0,1,0", "seed 0 appears twice"),
                                            ("-1", "negative")])
def test_bad_seeds_are_a_config_error_before_anything_runs(command, seeds, why, tmp_path, capsys):
    assert cli.main([command, "--methods", "fedit", "--seeds", seeds, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and why in err
    assert not any(tmp_path.iterdir())


def test_seeds_and_a_single_seed_together_are_a_config_error(tmp_path, capsys):
    assert cli.main(["compare", "--methods", "fedit", "--seed", "3", "--seeds", "0,1", "--output", str(tmp_path)]) == 2
    assert "keep one" in capsys.readouterr().err
    assert cli.main(["sweep", "--set", "seed=3", "--seeds", "0,1", "--output", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())


def test_default_seeds_come_from_the_model_preset():
    from simulations.cells import Seeds, resolve_seeds

    assert resolve_seeds(None, compare.PRESETS["tiny"], {}) == Seeds((42,), per_seed_dirs=False)  # old layout
    assert resolve_seeds(None, compare.PRESETS["minilm"], {}) == Seeds((42, 43, 44), per_seed_dirs=True)  # --real
    assert resolve_seeds(None, compare.PRESETS["minilm"], {"seed": 7}).values == (7, 8, 9)
    assert resolve_seeds(" 3, 1 ", compare.PRESETS["tiny"], {}) == Seeds((3, 1), per_seed_dirs=True)


def test_tune_lr_picks_each_cells_best_validation_lr_and_never_reads_test(monkeypatch, tmp_path):
    """tune_lr on stand-in runs: the pick is per cell, by validation accuracy then loss; the tries run on the
    validation split at the cell's first seed; every seed of the cell then runs at the pick, on test."""
    from simulations import cells
    from simulations.cells import Job

    scores = {("a", 1e-3): (0.5, 1.0), ("a", 1e-2): (0.6, 1.2), ("b", 1e-3): (0.7, 0.9), ("b", 1e-2): (0.7, 0.8)}
    ran = []

    def fake(tag, method, cfg, out, clients):
        ran.append((tag, cfg, out, clients))
        acc, loss = scores[tag.split()[0], cfg["train.lr"]]
        return {"final_accuracy": acc, "final_loss": loss}

    monkeypatch.setattr(cells, "run_or_reuse", fake)
    base = {"model.max-length": 32}
    jobs = [Job(c, s, tmp_path / c, compare.method_config({**base, "seed": s}, "fedit", tmp_path / c / f"seed-{s}",
                                                          ""), clients=k)
            for s in (5, 6) for c, k in (("a", 0), ("b", 1))]
    tuned, rows = cells.tune_lr(jobs, (1e-3, 1e-2), num_clients=3)
    assert [(r["cell"], r["lr"], r["chosen"]) for r in rows] == [("a", 1e-3, False), ("a", 1e-2, True),
                                                                  ("b", 1e-3, False), ("b", 1e-2, True)]
    assert len(ran) == 4 and all(cfg["seed"] == 5 and cfg["data.validation-fraction"] == cells.TUNE_FRACTION
                                 for _, cfg, _, _ in ran)  # the first seed, on validation
    tune = tmp_path / "a" / "tune"
    assert [out for _, _, out, _ in ran][:2] == [tune / "lr-0.001", tune / "lr-0.01"]
    assert [k for *_, k in ran] == [3, 3, 1, 1]  # the centralised-style job keeps its own client count
    assert [(j.tag, j.seed, j.cfg["train.lr"], j.cfg["data.validation-fraction"]) for j in tuned] == [
        ("a", 5, 1e-2, 0.0), ("b", 5, 1e-2, 0.0), ("a", 6, 1e-2, 0.0), ("b", 6, 1e-2, 0.0)]
    assert tuned[0].cfg["output-dir"] == jobs[0].cfg["output-dir"]


def test_tune_lr_end_to_end_writes_tuning_csv_and_the_lr_column(tmp_path):
    assert run_compare(tmp_path, "--tune-lr", "1e-4,3e-2", methods=["fedit", "fed_sb"]) == 0
    tried = read_rows(tmp_path, "tuning.csv")
    assert [(r["cell"], float(r["lr"])) for r in tried] == [(m, lr) for m in ("fedit", "fed_sb") for lr in (1e-4, 3e-2)]
    rows = {r["method"]: r for r in read_rows(tmp_path)}
    for m in ("fedit", "fed_sb"):
        mine = [r for r in tried if r["cell"] == m]
        best = max(mine, key=lambda r: (float(r["val_final_accuracy"]), -float(r["val_final_loss"])))
        assert [r["chosen"] for r in mine].count("True") == 1 and best["chosen"] == "True"
        assert float(rows[m]["lr"]) == float(best["lr"])
        for r in mine:  # the tries ran on validation; the reported run on test, at the pick
            ran = json.loads((tmp_path / m / "tune" / f"lr-{float(r['lr']):g}" / "run.json").read_text())["run_config"]
            assert ran["data.validation-fraction"] == 0.15 and ran["train.lr"] == float(r["lr"])
        final = json.loads((tmp_path / m / "run.json").read_text())["run_config"]
        assert final["data.validation-fraction"] == 0.0 and final["train.lr"] == float(best["lr"])
    assert f"| {float(rows['fedit']['lr']):g} |" in (tmp_path / "compare.md").read_text().splitlines()[4]


def test_bad_tune_lrs_are_a_config_error(tmp_path, capsys):
    for bad, why in (("1e-3", "2 or more"), ("x,1", "not a number"), ("1e-3,1e-3", "appears twice"), ("0,1", "> 0")):
        assert cli.main(["compare", "--methods", "fedit", "--tune-lr", bad, "--output", str(tmp_path)]) == 2
        assert why in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_own_data_accuracy_is_the_clients_last_round_mean_and_ranks_fedsa(compared, tmp_path):
    """With federated evaluation the own-data column is each run's last client_accuracy_mean (FedSA-LoRA's metric:
    its clients evaluate with their own B); without it the column is empty."""
    assert all(r["client_accuracy"] == "" for r in read_rows(compared))
    assert run_compare(tmp_path, "--set", "fraction-evaluate=1.0", methods=["fedit", "fedsa_lora"]) == 0
    for r in read_rows(tmp_path):
        hist = [json.loads(x) for x in (tmp_path / r["method"] / "metrics.jsonl").read_text().splitlines()]
        assert float(r["client_accuracy"]) == pytest.approx(hist[-1]["client_accuracy_mean"])
        assert len(hist[-1]["client_accuracy"]) == 3
    line = (tmp_path / "compare.md").read_text().splitlines()[5]
    assert line.startswith("| fedsa_lora |") and f"| {float(read_rows(tmp_path)[1]['client_accuracy']):.3f} |" in line

"""Device placement, bf16 autocast, gradient accumulation and the usage meter, on the CPU (tests/test_gpu.py has
the CUDA side)."""

from __future__ import annotations

import os

import pytest
import torch

from fedlora import accel
from fedlora.client import fit
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.strategy import RoundStats, reported_usage, summarise_usage
from fedlora.tasks import get_task
from fedlora.train import optimise

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no CUDA device is visible")


# ------------------------------------------------------------------------------------------------ the device key


def test_auto_is_the_cpu_without_cuda_and_cpu_is_always_the_cpu() -> None:
    assert accel.resolve_device("cpu") == torch.device("cpu")
    want = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert accel.resolve_device("auto") == want


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_cuda_device_names_the_key_and_the_fix(spec) -> None:
    with pytest.raises(ConfigError, match=r"cuda requested but no CUDA device is visible: set train.device=cpu"):
        accel.resolve_device(spec)
    cfg = FedLoraConfig.from_run_config({"train.device": spec})  # syntax fine: the device is asked where it is used
    with pytest.raises(ConfigError, match="train.device"):
        get_task(cfg).build_model("lora", 4)


def test_a_gpu_index_past_the_visible_devices_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert accel.resolve_device("cuda") == torch.device("cuda:0")
    assert accel.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\) are visible; use cuda:0..cuda:1"):
        accel.resolve_device("cuda:2")


@pytest.mark.parametrize(("key", "value"), [("train.device", "gpu"), ("train.device", "cuda:x"),
                                            ("train.device", "cuda:"), ("train.precision", "fp16"),
                                            ("train.micro-batch-size", -1), ("model.quantization", "int4")])
def test_bad_values_fail_at_start_up_naming_the_key(key, value) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FedLoraConfig.from_run_config({key: value})


def test_micro_batches_work_under_dp_sgd_through_a_client_round() -> None:
    """tests/test_privacy_dpsgd.py checks the equality; here the config path: accepted, and a round trains."""
    cfg = FedLoraConfig.from_run_config({"privacy.mode": "sample", "privacy.noise-multiplier": 1.0,
                                         "train.micro-batch-size": 4, "train.batch-size": 16, "train.local-steps": 2})
    res = fit(cfg, {}, 0, 4, server_round=1)
    assert res.metrics["epsilon"] > 0 and all(torch.isfinite(t).all() for t in res.tensors.values())


# ----------------------------------------------------------------------------------------------- mixed precision


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_off_on_the_cpu_and_on_for_cuda_bf16() -> None:
    cpu = torch.device("cpu")
    lin = torch.nn.Linear(4, 3)
    for precision in ("fp32", "bf16"):
        with accel.autocast(cpu, precision):
            assert lin(torch.randn(2, 4)).dtype == torch.float32
            assert not torch.is_autocast_enabled("cpu")
    ctx = accel.autocast(torch.device("cuda:0"), "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(accel.autocast(torch.device("cuda:0"), "fp32"), torch.autocast)


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_bf16_autocast_trains_fp32_adapters_also_under_dp_sgd(task, monkeypatch) -> None:
    """The CUDA code path, run with CPU autocast: the forward is bf16, the trainable tensors and their updates stay
    fp32, and opacus' per-example clipping accepts bf16 activations."""
    from fedlora.privacy.accountant import ClientAccountant
    from fedlora.privacy.dpsgd import train_local_dp

    monkeypatch.setattr(accel, "AUTOCAST_DEVICES", ("cuda", "cpu"))
    cfg = FedLoraConfig.from_run_config({"model.task": task, "train.precision": "bf16", "train.local-steps": 3,
                                         "train.batch-size": 8})
    t = get_task(cfg)
    _, enc, y = t.client_data("train", 0, 4)
    seen = []
    model = t.build_model("lora", 4)
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.logits.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = optimise(model, enc, y, t.batch_loss, cfg.train, seed=1)[0]
    assert seen and set(seen) == {torch.bfloat16}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())
    assert any(not torch.equal(before[n], p) for n, p in trained.items())
    assert all(torch.isfinite(torch.tensor(losses)))
    dp_model = t.build_model("lora", 4)
    dp_losses = train_local_dp(dp_model, enc, y, cfg.train, 1.0, 0.5, ClientAccountant("rdp"), seed=1,
                               loss_fn=t.batch_loss)[0]
    assert dp_losses and all(p.dtype == torch.float32 for p in dp_model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- gradient accumulation


def test_micro_batches_chunk_the_batch_in_order() -> None:
    idx = torch.arange(10)
    assert [c.tolist() for c in accel.micro_batches(idx, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert accel.micro_batches(idx, 0)[0] is idx and accel.micro_batches(idx, 10)[0] is idx


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
@pytest.mark.parametrize("mode", ["lora", "sb"])
def test_gradient_accumulation_equals_the_whole_batch(task, mode) -> None:
    """Uneven chunks (3 + 3 + 2 of a batch of 8): each chunk's mean loss weighted by its share gives the whole
    batch's gradient, so the per-step losses and the trained tensors match the un-split run."""
    runs = {}
    for micro in (0, 3):
        cfg = FedLoraConfig.from_run_config({"model.task": task, "train.local-steps": 4, "train.batch-size": 8,
                                             "train.micro-batch-size": micro, "train.lr": 0.01})
        t = get_task(cfg)
        _, enc, y = t.client_data("train", 1, 4)
        model = t.build_model(mode, 4)
        losses, correct, counted = optimise(model, enc, y, t.batch_loss, cfg.train, seed=3)
        runs[micro] = (losses, correct, counted, {n: p.detach() for n, p in model.named_parameters()
                                                  if p.requires_grad})
    (l0, c0, k0, p0), (l3, c3, k3, p3) = runs[0], runs[3]
    assert (c0, k0) == (c3, k3)
    assert torch.allclose(torch.tensor(l0), torch.tensor(l3), rtol=1e-5, atol=1e-6)
    assert l0[0] != l0[-1]  # it trained
    for name in p0:
        assert torch.allclose(p0[name], p3[name], rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------------------------------------ the usage meter


def test_the_meter_counts_rows_and_non_padding_tokens_only_inside_its_block() -> None:
    enc = {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])}
    accel.count_batch(enc, torch.tensor([0, 1]))  # outside any block: not counted anywhere
    with accel.metered(torch.device("cpu")) as usage:
        accel.count_batch(enc, torch.tensor([0, 1]))
        accel.count_batch(enc, torch.tensor([2]))
    assert (usage.examples, usage.tokens) == (3, 6)
    assert usage.seconds > 0 and usage.peak_memory_mb > 10  # this process holds torch: tens of MB at least
    m = usage.metrics()
    assert m["tokens_per_second"] == pytest.approx(6 / usage.seconds)


def test_a_client_round_reports_its_throughput_and_peak_memory() -> None:
    cfg = FedLoraConfig.from_run_config({"train.local-steps": 3, "train.batch-size": 8})
    res = fit(cfg, {}, 0, 4, server_round=1)
    n, enc, _ = get_task(cfg).client_data("train", 0, 4)
    assert res.metrics["examples_per_second"] > 0 and res.metrics["tokens_per_second"] > res.metrics[
        "examples_per_second"]  # several tokens per example
    assert res.metrics["peak_memory_mb"] > 10
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in res.tensors.values())


def test_reported_usage_keeps_finite_non_negative_figures_only() -> None:
    got = reported_usage({"tokens_per_second": 5.0, "peak_memory_mb": float("nan"), "examples_per_second": -1.0,
                          "train_loss": 1.0})
    assert got == {"tokens_per_second": 5.0}
    stats = RoundStats(round=1, client_usage={"1": {"tokens_per_second": 10.0, "peak_memory_mb": 100.0},
                                              "2": {"tokens_per_second": 30.0, "peak_memory_mb": 300.0},
                                              "3": {"tokens_per_second": 20.0}})
    summarise_usage(stats)
    assert (stats.tokens_per_second, stats.peak_memory_mb) == (20.0, 300.0)


def test_metrics_jsonl_and_the_round_line_show_usage(local_run, tmp_path) -> None:
    from fedlora.report import Reporter

    _, rows, _ = local_run(tmp_path, num_nodes=2)
    trained = [r for r in rows if r["round"] > 0]
    assert trained and all(len(r["client_usage"]) == 2 for r in trained)
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_mb"] > 0 for r in trained)
    line = Reporter.line(trained[-1])
    assert " tok/s" in line and "peak " in line


# ------------------------------------------------------------------------------------------ --gpus-per-client


def test_gpus_per_client_sets_the_client_resources_and_needs_a_gpu(monkeypatch) -> None:
    from fedlora import engine
    from fedlora.cli import check_gpus_per_client

    assert engine.simulation_federation_config(4, 2, 2)["client-resources-num-gpus"] == 0.0
    assert engine.simulation_federation_config(4, 2, 16, gpus_per_client=0.25)["client-resources-num-gpus"] == 0.25
    check_gpus_per_client(0.0, "simulation")
    check_gpus_per_client(0.0, "inprocess", "cuda")  # the in-process engine trains on train.device directly
    with pytest.raises(ConfigError, match="needs GPUs for the clients: add --gpus-per-client"):
        check_gpus_per_client(0.0, "simulation", "cuda:0")
    for hide in (True, False):
        link = engine.LocalSuperLink(hide_gpus=hide)
        try:
            env = link.env()
        finally:
            link.stop()
        assert env.get("CUDA_VISIBLE_DEVICES") == ("" if hide else os.environ.get("CUDA_VISIBLE_DEVICES"))
    for bad in (-0.5, 1.5):
        with pytest.raises(ConfigError, match="--gpus-per-client"):
            check_gpus_per_client(bad, "simulation")
    with pytest.raises(ConfigError, match="applies to --engine simulation"):
        check_gpus_per_client(0.5, "inprocess")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        check_gpus_per_client(0.5, "simulation")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_gpus_per_client(0.5, "simulation")
    check_gpus_per_client(2, "simulation")

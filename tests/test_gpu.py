"""The CUDA side of device placement, bf16, gradient accumulation, quantised bases and usage reporting.

Marked ``gpu``: skipped (with the reason) where no CUDA device is visible, run by ``benchmarks/gpu_check.sh``
on a GPU machine (``pytest -m gpu``). Every test compares the GPU against the CPU reference or a stated bound.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import adapter_state
from fedlora.client import fit
from fedlora.config import FedLoraConfig
from fedlora.tasks import get_task
from fedlora.train import optimise

pytestmark = pytest.mark.gpu


def _cfg(device: str, **extra) -> FedLoraConfig:
    return FedLoraConfig.from_run_config({"train.device": device, "train.local-steps": 4, "train.batch-size": 8,
                                         **extra})


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_training_on_cuda_matches_the_cpu_and_uploads_cpu_float32(task) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here: compare against the CPU
    results = {dev: fit(_cfg(dev, **{"model.task": task}), {}, 0, 4, server_round=1) for dev in ("cpu", "cuda")}
    cpu, gpu = results["cpu"], results["cuda"]
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in gpu.tensors.values())
    assert cpu.tensors.keys() == gpu.tensors.keys()
    for name in cpu.tensors:
        assert torch.allclose(cpu.tensors[name], gpu.tensors[name], atol=1e-4, rtol=1e-3), name
    assert gpu.metrics["train_loss"] == pytest.approx(cpu.metrics["train_loss"], rel=1e-4)
    assert gpu.metrics["peak_memory_mb"] < cpu.metrics["peak_memory_mb"]  # CUDA allocations, not the process RSS


def test_the_model_and_batches_live_on_the_device() -> None:
    cfg = _cfg("cuda")
    model = get_task(cfg).build_model("lora", 4)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {t.device.type for t in adapter_state(model).values()} == {"cpu"}


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_bf16_on_cuda_trains_fp32_adapters_close_to_fp32(task) -> None:
    fp32 = fit(_cfg("cuda", **{"model.task": task}), {}, 0, 4, server_round=1)
    bf16 = fit(_cfg("cuda", **{"model.task": task, "train.precision": "bf16"}), {}, 0, 4, server_round=1)
    assert all(t.dtype == torch.float32 for t in bf16.tensors.values())
    assert bf16.metrics["train_loss"] == pytest.approx(fp32.metrics["train_loss"], rel=2e-2)  # bf16: ~3 digits


def test_dp_sgd_on_cuda_with_bf16() -> None:
    cfg = _cfg("cuda", **{"privacy.mode": "sample", "privacy.noise-multiplier": 1.0, "train.precision": "bf16"})
    res = fit(cfg, {}, 0, 4, server_round=1)
    assert res.metrics["epsilon"] > 0 and all(torch.isfinite(t).all() for t in res.tensors.values())


def test_gradient_accumulation_on_cuda_equals_the_whole_batch() -> None:
    out = []
    for micro in (0, 3):
        cfg = _cfg("cuda", **{"train.micro-batch-size": micro})
        t = get_task(cfg)
        _, enc, y = t.client_data("train", 0, 4)
        model = t.build_model("lora", 4)
        out.append(optimise(model, {k: v.cuda() for k, v in enc.items()}, y.cuda(), t.batch_loss, cfg.train, 1)[0])
    assert torch.allclose(torch.tensor(out[0]), torch.tensor(out[1]), rtol=1e-4)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_a_quantised_base_on_cuda_trains_and_holds_less_memory(scheme) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = _cfg("cuda", **{"model.task": "causal_lm"})
    quant = _cfg("cuda", **{"model.task": "causal_lm", "model.quantization": scheme})
    full, q = get_task(cfg).build_model("lora", 4), get_task(quant).build_model("lora", 4)
    from fedlora.quantize import quantized_bytes

    assert quantized_bytes(q) < quantized_bytes(full)
    res = fit(quant, {}, 0, 4, server_round=1)
    assert res.tensors.keys() == adapter_state(full).keys()
    assert all(torch.isfinite(t).all() for t in res.tensors.values())


def test_a_federation_on_cuda_reports_device_memory(local_run, tmp_path) -> None:
    _, rows, summary = local_run(tmp_path, num_nodes=2, **{"train.device": "cuda", "train.precision": "bf16"})
    trained = [r for r in rows if r["round"] > 0]
    assert trained and all(0 < r["peak_memory_mb"] < 4096 for r in trained)
    assert summary["rounds"] >= 2


def test_the_same_seed_gives_the_same_round_on_cuda_with_dropout() -> None:
    cfg = _cfg("cuda", **{"adapter.dropout": 0.2})
    a, b = (fit(cfg, {}, 1, 4, server_round=3) for _ in range(2))
    c = fit(cfg, {}, 1, 4, server_round=4)  # another round: other dropout masks
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors)

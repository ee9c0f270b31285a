"""How much noise client-level DP (DP-FedAvg) puts on each round's mean update, for a federation's size and budget.

Why: DP-FedAvg clips every client's update to norm S and adds N(0, (z S / m)^2) per coordinate to the mean of the m
sampled updates, so the noise vector has norm about z S sqrt(d) / m over the d uploaded numbers, while the clipped
mean is at most S. Whether a preset can learn is decided before any training, by the accountant: z grows with the
sampling rate q = m / N and the rounds T at a fixed epsilon, so the noise falls only with more clients N in all (at a
fixed T it is roughly proportional to sqrt(T) / N). This table is how the client-level sweep preset (simulations/
privacy_sweep.py CLIENT_PRESETS; docs/privacy.md "Client-level DP at scale") was sized. d is counted from the real
model with the sweep preset's adapters (MiniLM, layer 5's query and value, r = 8, plus the head).

Run: HF_HUB_OFFLINE=1 python benchmarks/client_dp_noise.py [--methods fedit,ffa,fed_sb] [--epsilons 1,3,8]
     [--grid 300x60x15,1000x100x5,...]   (clients x sampled per round x rounds)
"""

from __future__ import annotations

import argparse
import math

from fedlora.config import FedLoraConfig

DEFAULT_GRID = "100x10x10,300x30x10,300x60x15,1000x50x10,1000x100x5,1000x100x10,1000x100x20,1000x200x10,2000x100x10"


def uploaded_numbers(method: str, overrides: dict) -> int:
    """Numbers a client of ``method`` uploads a round (the trained factors of every adapted layer and the head)."""
    from fedlora.adapters.state import set_trainable
    from fedlora.aggregation import aggregator_class
    from fedlora.tasks import get_task

    cfg = FedLoraConfig.from_run_config({**overrides, "method.name": method})
    agg = aggregator_class(method)()
    model = get_task(cfg).build_model(agg.mode, cfg.adapter.rank)
    set_trainable(model, agg.round_uploads(1))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    from fedlora.privacy.accountant import noise_for_budget
    from simulations.privacy_sweep import CLIENT_PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="fedit,ffa,fed_sb")
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--grid", default=DEFAULT_GRID, help="clients x sampled per round x rounds, comma-separated")
    args = p.parse_args()
    preset = {k: v for k, v in CLIENT_PRESETS["minilm"]["overrides"].items() if k.startswith(("adapter.", "model."))}
    dims = {m: uploaded_numbers(m, {"model.name": "minilm", **preset}) for m in args.methods.split(",")}
    print("d (uploaded numbers per client): " + ", ".join(f"{m} {d:,}" for m, d in dims.items()))
    eps = [float(e) for e in args.epsilons.split(",")]
    heads = " | ".join(f"noise norm / S ({m})" for m in dims)
    print(f"\n| clients | per round | rounds | epsilon | z | {heads} |")
    print("|---|---|---|---|---|" + "---|" * len(dims))
    for cell in args.grid.split(","):
        n, m, t = (int(x) for x in cell.split("x"))
        for e in eps:
            z = noise_for_budget(e, args.delta, m / n, t, "rdp")
            norms = " | ".join(f"{z * math.sqrt(d) / m:.2f}" for d in dims.values())
            print(f"| {n} | {m} | {t} | {e:g} | {z:.3f} | {norms} |")


if __name__ == "__main__":
    main()

"""Thin factored SVD of L @ Rt vs dense torch.linalg.svd of the materialised (d, d) product.

Why: FedSVD / FLoRA / FlexLoRA re-factorise every adapted layer every round; this shows the server cost of
doing it through fedlora.aggregation.linalg.thin_svd (QR + (m, m) core SVD, float64 inside) instead of a
dense SVD. The dense baseline is what naive code does: materialise the float32 product, float32 SVD.
Dense is skipped where its extrapolated time (d^3 from the largest measured size) exceeds ~10 s.

Run: python benchmarks/bench_linalg.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fedlora.aggregation.linalg import thin_svd

DIMS = (384, 1024, 4096)
WIDTHS = (8, 16, 64)
DENSE_BUDGET_S = 10.0


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocations, LAPACK workspace)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {args.repeats}")
    head = ("d_out x d_in", "m", "thin (ms)", "dense (ms)", "dense/thin", "max |err|")
    print(f"{head[0]:>12} {head[1]:>4} {head[2]:>11} {head[3]:>11} {head[4]:>11} {head[5]:>10}")
    dense_s: dict[int, float] = {}
    for d in DIMS:
        for m in WIDTHS:
            L = torch.randn(d, m, generator=gen)
            Rt = torch.randn(m, d, generator=gen)
            t_thin = median_time(lambda L=L, Rt=Rt: thin_svd(L, Rt), args.repeats)
            known = max(dense_s, default=None)
            estimate = dense_s[known] * (d / known) ** 3 if known else 0.0
            if estimate > DENSE_BUDGET_S:
                dense, ratio, err = f"~{estimate:.0f}s est", "-", "-"
            else:
                t_dense = median_time(lambda L=L, Rt=Rt: torch.linalg.svd(L @ Rt), args.repeats)
                dense_s[d] = max(dense_s.get(d, 0.0), t_dense)
                s_dense = torch.linalg.svdvals(L.double() @ Rt.double())[:m]
                err_v = float((thin_svd(L, Rt, dtype=torch.float64)[1] - s_dense).abs().max() / s_dense[0])
                dense, ratio, err = f"{t_dense * 1e3:.1f}", f"{t_dense / t_thin:.0f}x", f"{err_v:.1e}"
            print(f"{f'{d} x {d}':>12} {m:>4} {t_thin * 1e3:>11.2f} {dense:>11} {ratio:>11} {err:>10}")
    print("max |err|: largest singular-value difference vs float64 dense SVD, relative to s_max.")
    print(f"'est': dense skipped, extrapolated (d^3) time above the {DENSE_BUDGET_S:.0f} s budget.")


if __name__ == "__main__":
    main()

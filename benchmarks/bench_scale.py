"""Cost of a round against the population: the same 10 clients sampled per round out of 100, 1,000 or 10,000.

Why: cross-device studies sample tens of clients a round out of thousands; a round's cost must depend on the
clients sampled, not on how many exist. Each population runs one real ``fedlora run`` (Flower's ray simulation,
tiny model, iid partitions, no federated evaluation, 3 rounds) while the process tree's resident memory is sampled
every 0.2 s. Reported: seconds per round (from metrics.jsonl), the driver's peak RSS (the largest process that is
not a ray worker: the simulation process running the ServerApp and holding every node's state) and the largest
ray worker's (the client actors). Targets: a round at 10,000 within 1.5x of one at 100; driver memory growth under
1 kB per client.

Run: python benchmarks/bench_scale.py [--populations 100,1000,10000] [--sampled 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def sample_tree(root: psutil.Process, peaks: dict[str, float], stop: threading.Event) -> None:
    """Peak RSS (MiB) of the largest ray worker and of the largest other process under ``root``."""
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                rss = p.memory_info().rss / 2**20
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            kind = "actor" if cmd.startswith("ray::") or "default_worker.py" in cmd else "driver"
            if "raylet" in cmd or "gcs_server" in cmd or "dashboard" in cmd or "log_monitor" in cmd:
                kind = "ray system"
            peaks[kind] = max(peaks.get(kind, 0.0), rss)
            if not cmd:
                continue
            name = "process " + (cmd.split()[0].rsplit("/", 1)[-1] if not cmd.startswith("ray::") else cmd.split()[0])
            if kind == "driver":
                name += " " + next((w for w in cmd.split()[1:3] if not w.startswith("-")), "")
            peaks[name] = max(peaks.get(name, 0.0), rss)
        stop.wait(0.2)


def run(population: int, sampled: int, rounds: int, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fedlora.cli", "run", "--model", "tiny", "--num-clients", str(population),
           "--rounds", str(rounds), "--output", str(out),
           "--set", f"fraction-train={sampled / population!r}", "--set", "data.partition=iid",
           "--set", "fraction-evaluate=0.0", "--set", "data.min-partition-size=0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    peaks: dict[str, float] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_tree, args=(psutil.Process(proc.pid), peaks, stop), daemon=True)
    sampler.start()
    _, err = proc.communicate()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"population {population}: fedlora run failed ({proc.returncode}):\n{err[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    secs = [r["seconds"] for r in rows if r["round"] > 0]
    assert all(r["clients_aggregated"] == sampled for r in rows if r["round"] > 0), "not every round had its clients"
    procs = {k: round(v) for k, v in sorted(peaks.items(), key=lambda kv: -kv[1]) if k.startswith("process ")}
    return {"procs": procs, "population": population, "wall": wall, "round1": secs[0],
            "later": sum(secs[1:]) / max(len(secs) - 1, 1), "driver_mib": peaks.get("driver", 0.0),
            "actor_mib": peaks.get("actor", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--populations", default="100,1000,10000")
    ap.add_argument("--sampled", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    pops = [int(p) for p in args.populations.split(",")]
    import torch

    print(f"bench_scale: {time.strftime('%Y-%m-%d')} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.sampled} clients sampled per round, {args.rounds} rounds, tiny model, ray simulation", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-scale-") as tmp:
        for pop in pops:
            results.append(run(pop, args.sampled, args.rounds, Path(tmp) / str(pop)))
            r = results[-1]
            print(f"  {pop}: round 1 {r['round1']:.1f} s, later {r['later']:.2f} s; peak RSS (MiB) by process: "
                  + ", ".join(f"{k[8:]} {v}" for k, v in list(r["procs"].items())[:6]), flush=True)
    base = results[0]
    print("\n| clients | round 1 (s) | later rounds (s, mean) | later / smallest | whole run (s) | driver peak (MiB) "
          "| largest actor peak (MiB) |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['population']:,} | {r['round1']:.1f} | {r['later']:.2f} | {r['later'] / base['later']:.2f} | "
              f"{r['wall']:.1f} | {r['driver_mib']:.0f} | {r['actor_mib']:.0f} |")
    if len(results) > 1:
        last = results[-1]
        growth = (last["driver_mib"] - base["driver_mib"]) * 2**20 / (last["population"] - base["population"])
        ratio = last["later"] / base["later"]
        print(f"\nround at {last['population']:,} / round at {base['population']:,}: {ratio:.2f} (target <= 1.5, "
              f"{'PASS' if ratio <= 1.5 else 'FAIL'}); driver memory growth {growth:.0f} bytes per client "
              f"(target < 1024, {'PASS' if growth < 1024 else 'FAIL'})")


if __name__ == "__main__":
    main()

"""Bytes on the wire per round and method vs the tensors the method moves, and Fed-SB's upload vs FedIT's.

Why: fedlora reports logical bytes (sum of numel x 4 of what a method moves: adapter tensors and the head) as its
communication cost; this checks that the serialised Flower messages (fedlora.wire.message_wire_bytes, logged in
metrics.jsonl as wire_bytes_down/up) are what the logical count says (target ratio <= 1.02), and that Fed-SB's
r x r upload saves what its shapes promise: (d_in + d_out) r / r^2 per layer against FedIT.

Each method runs one real federation (the real ServerApp and ClientApp functions on fedlora.localgrid.LocalGrid,
every message round-tripped through Flower's encoding) of --clients clients x --rounds rounds with a short local
training; round 1 carries the frozen factors of FFA / Fed-SB and an all-zero B (Flower deduplicates identical
chunks, so zeros are nearly free), later rounds are the steady state.

The codec table: wire.upload float32 / bfloat16 / float16 / int8 on one FedIT upload at MiniLM and LLaMA-7B shapes.

Run: python benchmarks/bench_wire.py [--models tiny,minilm] [--rounds 2] [--clients 3] [--output runs/bench-wire]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import torch
from bench_aggregators import header

from fedlora import naming
from fedlora.aggregation import AggregatorConfig, available, get_aggregator
from fedlora.checkpoint import load_checkpoint
from fedlora.cli import quiet_flower
from simulations.cells import run_method

TARGET = 1.02  # serialised / logical bytes
HETEROGENEOUS_RANKS = "4,6,8"  # client ranks for flora / flexlora / hetlora (adapter.rank 8 = r_max)


def run(model: str, method: str, args: argparse.Namespace, root: Path) -> tuple[list[dict], Path]:
    """One federation of ``method`` on ``model``; returns its metrics.jsonl rows and its output folder."""
    out = root / model / method
    shutil.rmtree(out, ignore_errors=True)
    base = {"model.name": model, "num-server-rounds": args.rounds, "train.local-steps": args.local_steps,
            "train.batch-size": 8, "model.max-length": 32, "data.max-eval-examples": 16,
            "data.partition": "iid", "fraction-evaluate": 0.0, "adapter.rank": args.rank}
    if get_aggregator(method).heterogeneous_ranks:
        base["adapter.ranks"] = HETEROGENEOUS_RANKS
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own per-round lines
        run_method(method, base, out, args.clients)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["bytes_down"] > 0], out  # round 0 is the initial evaluation only


def head_bytes(folder: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Float32 bytes of the head (extras) one client uploads, and (d_out, d_in) per adapted layer."""
    state, _, _ = load_checkpoint(folder)
    head = sum(t.numel() * 4 for n, t in state.items() if naming.is_extra(n))
    return head, get_aggregator("fedit").layer_dims(state)


def synthetic(methods: list[str], layers: int, d: int, r: int) -> None:
    """One client's upload at LLaMA-7B adapter shapes, serialised as the ClientApp does (no model needed)."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.wire import logical_bytes, message_wire_bytes, to_record

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # Message() needs a run identity
    groups: dict[tuple[str, ...], list[str]] = {}
    for m in methods:
        groups.setdefault(get_aggregator(m).uploads, []).append(m)
    print(f"\none upload at LLaMA-7B adapter shapes ({layers} layers of {d} x {d}, r = {r}, no head): "
          f"serialised reply vs logical bytes")
    print(f"{'uploads':8s} {'logical':>12s} {'wire':>12s} {'ratio':>7s} {'ok':>4s}  methods")
    dims = {"A": (r, d), "B": (d, r), "R": (r, r)}
    for uploads, names in groups.items():
        tensors = {naming.key(f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj", role): torch.randn(*dims[role])
                   for i in range(layers) for role in uploads}
        msg = Message(RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": 100})}),
                      dst_node_id=0, message_type="train")
        wire, logical = message_wire_bytes(msg), logical_bytes(tensors)
        ok = "PASS" if wire / logical <= TARGET else "FAIL"
        print(f"{','.join(uploads):8s} {logical:12,d} {wire:12,d} {wire / logical:7.4f} {ok:>4s}  {' '.join(names)}")


def codec_table(shapes: dict[str, tuple[int, int, int]]) -> None:
    """wire.upload codecs on one FedIT upload (A and B of every layer, random: A ~ N(0, 1/d_in) as initialised,
    B ~ N(0, 1e-4) as after a little training): bytes, ratio to float32 on the wire, relative L2 rounding."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.wire import CODECS, logical_bytes, message_wire_bytes, roundtrip_error, to_record

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    print("\nwire.upload codecs on one FedIT upload (random A ~ N(0, 1/d_in), B ~ N(0, 1e-4)); ratio = wire bytes "
          "/ float32's wire bytes; error = ||decoded - sent|| / ||sent||")
    print(f"{'shapes':22s} {'codec':9s} {'logical':>13s} {'wire':>13s} {'ratio':>6s} {'error':>9s} {'encode ms':>9s}")
    gen = torch.Generator().manual_seed(0)
    for label, (layers, d, r) in shapes.items():
        tensors = {}
        for i in range(layers):
            layer = f"model.layers.{i // 2}.self_attn.{'qv'[i % 2]}_proj"
            tensors[naming.key(layer, "A")] = torch.randn(r, d, generator=gen) / d ** 0.5
            tensors[naming.key(layer, "B")] = torch.randn(d, r, generator=gen) * 1e-2
        base = None
        for codec in CODECS:
            to_record(tensors, codec)  # warm-up: first calls of torch's kernels are slow
            t0 = time.perf_counter()
            record = to_record(tensors, codec)
            ms = 1000 * (time.perf_counter() - t0)
            wire = message_wire_bytes(Message(RecordDict({"arrays": record, "metrics": MetricRecord(
                {"num-examples": 100})}), dst_node_id=0, message_type="train"))
            base = base or wire
            print(f"{label:22s} {codec:9s} {logical_bytes(tensors, codec):13,d} {wire:13,d} {wire / base:6.3f} "
                  f"{roundtrip_error(tensors, record):9.2e} {ms:9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,minilm")
    p.add_argument("--methods", default=",".join(available()))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="runs/bench-wire")
    p.add_argument("--no-synthetic", action="store_true", help="skip the LLaMA-7B-shaped upload")
    p.add_argument("--no-codecs", action="store_true", help="skip the wire.upload codec table")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    quiet_flower()
    root = Path(args.output)
    print(header(args.threads))
    print(f"{args.clients} clients x {args.rounds} rounds, adapter rank {args.rank} (flora/flexlora/hetlora: "
          f"client ranks {HETEROGENEOUS_RANKS}); bytes per round, all clients; logical = numel x 4 of the "
          f"tensors moved (adapters + head); wire = serialised Flower messages; target wire/logical <= {TARGET}")
    if not args.no_synthetic:
        synthetic(args.methods.split(","), 64, 4096, 16)
    if not args.no_codecs:
        codec_table({"minilm 12x{q,v} 384 r8": (24, 384, 8), "7b 32x{q,v} 4096 r16": (64, 4096, 16)})
    for model in args.models.split(","):
        print(f"\nmodel {model}")
        print(f"{'method':10s} {'round':>5s} {'down logical':>13s} {'down wire':>11s} {'ratio':>6s} "
              f"{'up logical':>11s} {'up wire':>11s} {'ratio':>6s} {'ok':>4s} {'extra B/upload':>14s} {'tensors':>7s}")
        ups: dict[str, tuple[float, float, Path]] = {}
        tensors: dict[str, int] = {}  # tensors in one upload (adapter factors + head)
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            rows, out = run(model, method, args, root)
            state, _, _ = load_checkpoint(out)
            agg = get_aggregator(method, AggregatorConfig(rank=args.rank))
            tensors[method] = len(agg.expected_upload(state, args.rank))
            for r in rows:
                down = r["wire_bytes_down"] / r["bytes_down"]
                up = r["wire_bytes_up"] / r["bytes_up"]
                ok = "PASS" if max(down, up) <= TARGET else "FAIL"
                extra = (r["wire_bytes_up"] - r["bytes_up"]) / r["clients_aggregated"]
                print(f"{method:10s} {r['round']:5d} {r['bytes_down']:13,d} {r['wire_bytes_down']:11,d} {down:6.3f} "
                      f"{r['bytes_up']:11,d} {r['wire_bytes_up']:11,d} {up:6.3f} {ok:>4s} {extra:14,.0f} "
                      f"{tensors[method]:7d}")
            last = rows[-1]
            n = last["clients_aggregated"]
            ups[method] = (last["bytes_up"] / n, last["wire_bytes_up"] / n, out)
            print(f"{'':10s} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if "fedit" in ups and "fed_sb" in ups:
            head, dims = head_bytes(ups["fedit"][2])
            r = args.rank
            expected = sum((d_in + d_out) * r for d_out, d_in in dims.values()) / (len(dims) * r * r)
            (it_log, it_wire, _), (sb_log, sb_wire, _) = ups["fedit"], ups["fed_sb"]
            print(f"Fed-SB vs FedIT upload per client ({len(dims)} adapted layers, r = {r}, head {head:,d} B): "
                  f"adapter only {(it_log - head) / (sb_log - head):.1f}x measured (logical) vs "
                  f"{expected:.1f}x expected = sum (d_in + d_out) r / sum r^2; with the head "
                  f"{it_log / sb_log:.2f}x logical, {it_wire / sb_wire:.2f}x on the wire")


if __name__ == "__main__":
    main()

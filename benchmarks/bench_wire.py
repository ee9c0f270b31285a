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



# -- FedEx-LoRA: its residual as thin factors vs the paper code's dense residual (a section of its own) ----------------
FEDEX_SHAPES = {"minilm": (12, 384, 8), "7b": (64, 4096, 16)}  # adapted layers, d_out = d_in, rank


def fedex_residual_from_shapes(clients: list[int], rounds: int) -> None:
    """Per node, per round, the residual part of FedEx-LoRA's downlink (A, B and the head are the same either way):
    (K - 1) r (d_out + d_in) new factor columns per layer (docs/algorithms.md section 14) until the layer's width
    passes min(d_out, d_in), then the whole recompressed min(d)-wide pair every round; the paper's code: the dense
    d_out x d_in residual every round. float32."""
    print(f"\nFedEx-LoRA residual downlink per node and round, from shapes (float32; {rounds} rounds summed; the "
          "A, B and head bytes, the same for both, left out)")
    print(f"{'shape':7s} {'clients':>7s} {'cols/round':>10s} {'factored/round':>15s} {'dense/round':>12s} "
          f"{'ratio':>6s} {'saturates':>9s} {'after':>12s} {f'factored {rounds} r':>14s} {f'dense {rounds} r':>12s}")
    for shape, (layers, d, r) in FEDEX_SHAPES.items():
        dense = layers * d * d * 4
        for k in clients:
            cols = (k - 1) * r
            factored = layers * cols * 2 * d * 4
            saturated = layers * d * 2 * d * 4  # min(d) rows of MA and columns of MB
            first_full = d // cols + 1 if cols else None  # the first aggregation whose width exceeds min(d)
            total = sum(factored if first_full is None or t < first_full else saturated for t in range(1, rounds + 1))
            sat = "never" if first_full is None else f"agg. {first_full}"
            before = "-" if first_full == 1 else _mb(factored)  # - : saturated from the first aggregation on
            ratio = "-" if first_full == 1 else f"{factored / dense:.2f}"
            print(f"{shape:7s} {k:7d} {cols:10d} {before:>15s} {_mb(dense):>12s} {ratio:>6s} "
                  f"{sat:>9s} {_mb(saturated):>12s} {_mb(total):>14s} {_mb(rounds * dense):>12s}")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def fedex_residual_measured(models: list[str], clients: int, rounds: int, root: Path) -> None:
    """A real FedEx-LoRA federation per model (every node trains every round): each round's downlink as measured
    (logical and wire bytes, all train messages) against the same messages with the dense residual instead of its
    factors. Round 1's messages carry A, B and the head only (the residual is still empty); their size, per node,
    is what every later message carries besides the residual."""
    args = argparse.Namespace(rounds=rounds, local_steps=2, rank=8, clients=clients)
    for model in models:
        rows, out = run(model, "fedex_lora", args, root)
        state, _, _ = load_checkpoint(out)
        dims = get_aggregator("fedit").layer_dims(state)
        dense = 4 * sum(d_out * d_in for d_out, d_in in dims.values())
        print(f"\nFedEx-LoRA downlink measured, {model}: {clients} clients x {rounds} rounds, rank 8, {len(dims)} "
              f"adapted layers; dense residual {_mb(dense)} per node")
        print(f"{'round':>5s} {'residual width':>14s} {'down logical':>13s} {'down wire':>11s} {'residual sent':>13s} "
              f"{'down with dense residual':>24s} {'dense / factored':>16s}")
        base = rows[0]["bytes_down"]  # round 1: A, B and the head, all nodes
        min_d = min(min(d) for d in dims.values())
        for r in rows:
            width = min((r["round"] - 1) * (clients - 1) * 8, min_d)  # recompressed at min(d_out, d_in)
            with_dense = base + (clients * dense if r["round"] > 1 else 0)
            print(f"{r['round']:5d} {width:14d} {r['bytes_down']:13,d} {r['wire_bytes_down']:11,d} "
                  f"{r['bytes_down'] - base:13,d} {with_dense:24,d} {with_dense / r['bytes_down']:16.2f}")


def fedex_main(argv: list[str]) -> None:
    """``python benchmarks/bench_wire.py fedex-residual [--models tiny,minilm] [--clients 3] [--rounds 6]``: the two
    tables above (benchmarks/README.md section 8)."""
    p = argparse.ArgumentParser(prog="bench_wire.py fedex-residual", description=fedex_residual_from_shapes.__doc__)
    p.add_argument("--models", default="tiny,minilm", help="measured federations ('' = shapes only)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--shape-clients", default="3,10,100", help="client counts of the from-shapes table")
    p.add_argument("--shape-rounds", type=int, default=20)
    p.add_argument("--output", default="runs/bench-wire-fedex")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    quiet_flower()
    print(header(1))
    fedex_residual_from_shapes([int(k) for k in args.shape_clients.split(",")], args.shape_rounds)
    if args.models:
        fedex_residual_measured(args.models.split(","), args.clients, args.rounds, Path(args.output))


if __name__ == "__main__":
    import sys

    fedex_main(sys.argv[2:]) if sys.argv[1:2] == ["fedex-residual"] else main()

"""Split one data set's example indices among clients: IID, or non-IID over labels by Dirichlet sampling.

flwr-datasets' partitioners do the sampling, so our splits are the ones Flower users know; they run offline
on an in-memory ``datasets.Dataset`` of (label, index) rows, and we hand back plain index lists for
``TextDataset.subset``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

SCHEMES = ("iid", "dirichlet")


def partition(
    labels: Sequence[int],
    num_partitions: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[list[int]]:
    """Sorted indices of each partition: disjoint, together all of ``range(len(labels))``, fixed by ``seed``.

    ``scheme="iid"`` shuffles and cuts into equal shares. ``scheme="dirichlet"`` gives each partition a share
    of every label drawn from Dirichlet(``alpha``): small alpha (0.1) puts most of a label on few partitions,
    large alpha (100) approaches IID. Dirichlet draws are repeated until every partition holds at least
    ``min_partition_size`` examples (IID shares are equal, so it does not apply there).
    """
    labels = [int(y) for y in labels]
    _check(len(labels), num_partitions, scheme, alpha, min_partition_size)
    if scheme == "iid":
        return _iid(len(labels), num_partitions, seed)
    rows = datasets.Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = rows
    with warnings.catch_warnings():  # one warning per failed draw; the outcome is reported below
        warnings.simplefilter("ignore")
        try:
            partitioner.load_partition(0)  # draws all partitions
        except ValueError as e:
            raise ValueError(_dirichlet_advice(labels, num_partitions, alpha, seed, min_partition_size)) from e
    # The draw assigned every row to a partition at once; reading that assignment instead of selecting each
    # partition as a Dataset keeps the cost independent of the number of partitions (rows' positions are our
    # indices: shuffle=False). Fallback: the public path, one select per partition.
    drawn = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(drawn, dict) and len(drawn) == num_partitions:
        return [sorted(int(i) for i in drawn[p]) for p in range(num_partitions)]
    return [sorted(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]


def _iid(n: int, num_partitions: int, seed: int) -> list[list[int]]:
    """flwr-datasets' IidPartitioner on ``datasets.Dataset.shuffle(seed)`` of the rows, in numpy: the same
    permutation (``np.random.default_rng(seed).permutation(n)``) cut into the same contiguous shards (the first
    n % k shards one longer), in milliseconds for any number of partitions instead of one Dataset shard per
    partition (seconds per thousand). tests/test_data.py checks it against the flwr-datasets path."""
    perm = np.random.default_rng(seed).permutation(n)
    div, mod = divmod(n, num_partitions)
    out = []
    for i in range(num_partitions):
        start = div * i + min(i, mod)
        out.append(np.sort(perm[start:start + div + (1 if i < mod else 0)]).tolist())
    return out


def flwr_iid(n: int, num_partitions: int, seed: int) -> list[list[int]]:
    """The flwr-datasets path :func:`_iid` replicates (kept for the equality test)."""
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = datasets.Dataset.from_dict({"index": list(range(n))}).shuffle(seed=seed)
    return [sorted(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]


def _dirichlet_advice(labels: list[int], num_partitions: int, alpha: float, seed: int, min_size: int) -> str:
    """Why the draws failed and what works for these very values: halving data.min-partition-size until the
    draws succeed (a few tries, each well under a second), so the advice is checked, never a guess."""
    n = len(labels)
    mean = n / num_partitions
    fixes = []
    size = min_size // 2
    while size > 0:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                partition(labels, num_partitions, "dirichlet", alpha, seed, size)
            break
        except ValueError:
            size //= 2
    fixes.append(f"lower data.min-partition-size to {size} (checked: it works for these values)")
    if alpha < 1.0:
        fixes.append("raise data.dirichlet-alpha towards 1.0 (less skew)")
    fixes += [f"use data.partition='iid' (equal shares of {n // num_partitions})",
              "or use fewer clients (--num-clients / num-supernodes)"]
    return (f"data.partition='dirichlet' with data.dirichlet-alpha={alpha:g}: 11 draws failed to give each of the "
            f"{num_partitions} clients at least data.min-partition-size={min_size} of the {n} examples (a mean "
            f"of {mean:.1f} per client; Dirichlet shares vary widely around it). Fix: " + "; ".join(fixes))


def label_histogram(
    labels: Sequence[int], partitions: Sequence[Sequence[int]], num_labels: int
) -> list[list[int]]:
    """``counts[p][y]`` = examples of label ``y`` in partition ``p``: the skew to log when a run starts."""
    counts = [[0] * num_labels for _ in partitions]
    for row, indices in zip(counts, partitions, strict=True):
        for i in indices:
            row[labels[i]] += 1
    return counts


def _check(n: int, num_partitions: int, scheme: str, alpha: float, min_partition_size: int) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"data.partition = {scheme!r} is not a scheme; use one of {', '.join(SCHEMES)}")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"data.num-partitions = {num_partitions!r}; use an int >= 1 (one per client)")
    if num_partitions > n:
        raise ValueError(
            f"data.num-partitions = {num_partitions} exceeds the {n} examples; use at most {n} partitions"
        )
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(
                f"data.dirichlet-alpha = {alpha!r}; use a number > 0 (0.1 very skewed, 1 mild, 100 near IID)"
            )
        if min_partition_size < 0 or num_partitions * min_partition_size > n:
            raise ValueError(
                f"data.min-partition-size = {min_partition_size} with data.num-partitions = {num_partitions} "
                f"needs {num_partitions * min_partition_size} examples, there are {n}; lower either (>= 0)"
            )

"""Data for the clients: load labelled text offline, split it among clients, report the split's skew."""

from __future__ import annotations

from fedlora.data.loading import BUILTIN, TextDataset, builtin_path, load_dataset
from fedlora.data.partition import SCHEMES, label_histogram, partition

__all__ = [
    "BUILTIN",
    "SCHEMES",
    "TextDataset",
    "builtin_path",
    "label_histogram",
    "load_dataset",
    "partition",
]

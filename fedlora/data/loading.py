"""Labelled text from the built-in data set or a local folder, as plain Python lists.

The project runs offline, so a source is either a built-in name or a local folder: ``{split}.jsonl`` or
``{split}.csv`` files (fields ``text`` and ``label``), or a folder written by ``datasets``' ``save_to_disk``.
Label ids must mean the same class in every split (the model's head is sized once), so class names come from
the folder's ``labels.json`` (the name of id i at position i) or, without it, from all splits of the folder
(every ``.jsonl`` / ``.csv`` file there, every split of a saved ``DatasetDict``), not only the one asked for:
int ids -> "0".."max", class names -> sorted.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
BUILTIN = ("austen",)
FORMATS = (".jsonl", ".csv")
_INT = re.compile(r"-?\d+")


@dataclass
class TextDataset:
    """One split: ``texts[i]`` has class ``labels[i]``, an index into ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"label {bad[0]} is outside the {len(self.label_names)} label_names")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """The examples at ``indices`` (e.g. one client's partition), with the same label space."""
        indices = list(indices)
        return TextDataset(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], list(self.label_names)
        )


def builtin_path(name: str) -> Path:
    """Folder of a built-in data set, found from this file so that it works from any working directory."""
    if name not in BUILTIN:
        raise ValueError(f"data.source = {name!r} is not a built-in data set; built-in: {', '.join(BUILTIN)}")
    return BUILTIN_DIR / name


def load_dataset(source: str, split: str) -> TextDataset:
    """Load ``split`` ("train", "test", ...) of ``source``: "austen" or a local folder (see module doc)."""
    folder = builtin_path(source) if source in BUILTIN else _local_folder(source)
    files = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
    if len(files) > 1:
        raise ValueError(
            f"data.source = {source!r} has both {split}.jsonl and {split}.csv; keep one of them"
        )
    if files:
        return _load_file(files[0], source)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _load_saved(folder, source, split)
    available = sorted({p.stem for ext in FORMATS for p in folder.glob(f"*{ext}")})
    raise ValueError(
        f"split {split!r} not found in data.source = {source!r} (splits there: {available or 'none'}). "
        f"Add {split}.jsonl or {split}.csv (fields 'text' and 'label') to {folder}, or use a split it has."
    )


def _local_folder(source: str) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if folder.is_file():
        raise ValueError(
            f"data.source = {source!r} is a file; give the folder that holds it "
            f"(split files named train.jsonl / test.jsonl or train.csv / test.csv)"
        )
    raise ValueError(
        f"data.source = {source!r}: no such folder. Use {' or '.join(map(repr, BUILTIN))} (built in) or "
        f"a local folder holding {{split}}.jsonl / {{split}}.csv files (fields 'text' and 'label') or "
        f"written by datasets' save_to_disk. Hugging Face Hub names are not supported: the project runs "
        f"offline. On a machine with network access run "
        f"datasets.load_dataset({source!r}).save_to_disk('<folder>'), copy the folder here and set "
        f"data.source to its path."
    )


# ---- jsonl / csv files ---------------------------------------------------------------------------------


def _load_file(path: Path, source: str) -> TextDataset:
    texts, raw = _read_rows(path)
    names = _names_file(path.parent)
    if names is None:  # no labels.json: the label space is whatever every split of the folder uses
        siblings = [p for p in path.parent.glob(f"*{path.suffix}") if p != path]
        raw_all = raw + [y for p in siblings for y in _read_rows(p)[1]]
        if path.suffix == ".csv":
            raw, raw_all = _csv_ints(raw, raw_all)
        names = _label_names(raw_all, f"data.source = {source!r}")
    elif path.suffix == ".csv":
        raw, _ = _csv_ints(raw, raw)
    return TextDataset(texts, _label_ids(raw, names, str(path)), names)


def _read_rows(path: Path) -> tuple[list[str], list[Any]]:
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _csv_rows(path)
    texts: list[str] = []
    labels: list[Any] = []
    for where, row in rows:
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or label is None or label == "":
            raise ValueError(
                f"{where}: column 'text' = {text!r:.60} / 'label' = {label!r:.60}; every row needs 'text' (a "
                f"string) and 'label' (an int id or a class name)"
            )
        texts.append(text)
        labels.append(label)
    if not texts:
        raise ValueError(f"{path} has no examples; fill it or remove it")
    return texts, labels


def _jsonl_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from e
            if not isinstance(row, dict) or "text" not in row or "label" not in row:
                raise ValueError(
                    f"{path}:{n}: {line.strip()[:80]!r} is not a JSON object with fields 'text' and 'label'"
                )
            yield f"{path}:{n}", row


def _csv_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("text", "label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: no column {missing[0]!r} in the header {reader.fieldnames}; the first line must "
                f"name the columns, with 'text' and 'label' among them"
            )
        for n, row in enumerate(reader, 2):
            yield f"{path}:{n}", row


def _csv_ints(raw: list[Any], raw_all: list[Any]) -> tuple[list[Any], list[Any]]:
    """CSV has no types: labels are ids when every cell in the folder is an integer, class names otherwise."""
    if all(_INT.fullmatch(y) for y in raw_all):
        return [int(y) for y in raw], [int(y) for y in raw_all]
    return raw, raw_all


def _names_file(folder: Path) -> list[str] | None:
    path = folder / "labels.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{path} must be a JSON list of class names, the name of label id i at position i")
    return names


# ---- datasets' save_to_disk folders -----------------------------------------------------------------------


def _load_saved(folder: Path, source: str, split: str) -> TextDataset:
    import datasets  # here, not at the top: jsonl / csv sources do not pay for importing it

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        splits = dict(loaded)
    else:  # one Dataset is one split; "train" when it does not record which
        splits = {str(loaded.split) if loaded.split else "train": loaded}
    if split not in splits:
        raise ValueError(
            f"split {split!r} not found in data.source = {source!r} (splits there: {sorted(splits)}). Save "
            f"a DatasetDict with that split (DatasetDict({{'train': ..., {split!r}: ...}}).save_to_disk()) "
            f"or use a split it has."
        )
    for name, ds in splits.items():
        missing = [c for c in ("text", "label") if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"split {name!r} of data.source = {source!r}: no column {missing[0]!r} (columns: "
                f"{ds.column_names}). Rename before saving, e.g. ds.rename_column('sentence', 'text')."
            )
    ds = splits[split]
    texts = list(ds["text"])
    if not texts:
        raise ValueError(f"split {split!r} of data.source = {source!r} has no examples")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"split {split!r} of data.source = {source!r}: column 'text' holds {bad[0]!r}")
    if isinstance(ds.features["label"], datasets.ClassLabel):
        names = list(ds.features["label"].names)
    else:
        names = _label_names([y for d in splits.values() for y in d["label"]], f"data.source = {source!r}")
    return TextDataset(texts, _label_ids(list(ds["label"]), names, f"split {split!r} of {source!r}"), names)


# ---- labels ---------------------------------------------------------------------------------------------


def _label_names(values: Sequence[Any], where: str) -> list[str]:
    """Class names when no file gives them: int ids -> "0".."max", class names -> sorted."""
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return sorted(set(values))
    if kinds == {int}:
        if min(values) < 0:
            raise ValueError(f"{where}: column 'label' has {min(values)}; label ids start at 0")
        return [str(i) for i in range(max(values) + 1)]
    raise ValueError(
        f"{where}: column 'label' holds {sorted(k.__name__ for k in kinds)}; use int ids (0, 1, ...) in "
        f"every split, or class names (strings) in every split"
    )


def _label_ids(values: Sequence[Any], names: list[str], where: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids: list[int] = []
    for y in values:
        i = index.get(y) if isinstance(y, str) else y if type(y) is int else None
        if i is None or not 0 <= i < len(names):
            raise ValueError(
                f"{where}: column 'label' = {y!r} is not one of the {len(names)} classes {names}; "
                f"use an id 0..{len(names) - 1} or one of these names (labels.json, if present, lists them)"
            )
        ids.append(i)
    return ids

"""fedlora.data: the built-in Austen set, local folders, partitions and the tiny model's vocabulary."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest

from fedlora.data import TextDataset, builtin_path, label_histogram, load_dataset, partition

AUSTEN = builtin_path("austen")
AUSTEN_NAMES = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey",
                "Persuasion"]


@pytest.fixture(scope="module")
def austen_train() -> TextDataset:
    return load_dataset("austen", "train")


# ---- built-in data set ----------------------------------------------------------------------------------


def test_austen_counts_from_any_cwd(austen_train, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the built-in path must not depend on the working directory
    test = load_dataset("austen", "test")
    assert (len(austen_train), len(test)) == (11381, 1264)
    assert austen_train.label_names == test.label_names == AUSTEN_NAMES
    assert austen_train.num_labels == 6
    assert [Counter(austen_train.labels)[y] for y in range(6)] == [1973, 2135, 2284, 2565, 1226, 1198]
    assert [Counter(test.labels)[y] for y in range(6)] == [219, 237, 254, 285, 136, 133]
    assert austen_train.texts[0].startswith('"No wonder that Mr. Rushworth')
    assert austen_train.labels[0] == 2
    assert not set(austen_train.texts) & set(test.texts)


def test_subset_keeps_label_space(austen_train):
    sub = austen_train.subset([5, 0, 5])
    assert sub.texts == [austen_train.texts[5], austen_train.texts[0], austen_train.texts[5]]
    assert sub.labels == [austen_train.labels[5], austen_train.labels[0], austen_train.labels[5]]
    assert sub.label_names == AUSTEN_NAMES and len(sub) == 3
    with pytest.raises(ValueError, match="outside"):
        TextDataset(["a"], [6], ["x"])


# ---- local folders ------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows({"id": i, **r} for i, r in enumerate(rows))


# "pear" is only in train and "apple" only in test: ids must still agree between the splits
TRAIN = [{"text": "a red one", "label": "pear"}, {"text": "b, \"quoted\"\nline", "label": "fig"},
         {"text": "c", "label": "fig"}]
TEST = [{"text": "d", "label": "fig"}, {"text": "e", "label": "apple"}]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_string_labels_map_consistently_between_splits(tmp_path, fmt):
    write = _jsonl if fmt == "jsonl" else _csv
    write(tmp_path / f"train.{fmt}", TRAIN)
    write(tmp_path / f"test.{fmt}", TEST)
    train, test = load_dataset(str(tmp_path), "train"), load_dataset(str(tmp_path), "test")
    assert train.label_names == test.label_names == ["apple", "fig", "pear"]
    assert train.texts == ["a red one", "b, \"quoted\"\nline", "c"]
    assert (train.labels, test.labels) == ([2, 1, 1], [1, 0])


def test_csv_int_labels_and_labels_json(tmp_path):
    _csv(tmp_path / "train.csv", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    _csv(tmp_path / "test.csv", [{"text": "z", "label": 3}])
    train = load_dataset(str(tmp_path), "train")
    assert (train.labels, train.label_names) == ([0, 2], ["0", "1", "2", "3"])  # max over both splits
    (tmp_path / "labels.json").write_text(json.dumps(["w", "x", "y", "z"]))
    assert load_dataset(str(tmp_path), "test").label_names == ["w", "x", "y", "z"]


def test_label_outside_labels_json_is_rejected(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 2}])
    (tmp_path / "labels.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match=r"'label' = 2 is not one of the 2 classes"):
        load_dataset(str(tmp_path), "train")


def test_save_to_disk_dataset_dict(tmp_path):
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["bad", "good", "fine"], "label": [0, 1, 1]}, features),
        "test": datasets.Dataset.from_dict({"text": ["meh"], "label": [0]}, features),
    }).save_to_disk(str(tmp_path / "dd"))
    train = load_dataset(str(tmp_path / "dd"), "train")
    assert (train.texts, train.labels) == (["bad", "good", "fine"], [0, 1, 1])
    assert train.label_names == ["neg", "pos"]
    assert load_dataset(str(tmp_path / "dd"), "test").labels == [0]
    with pytest.raises(ValueError, match=r"split 'validation' not found.*\['test', 'train'\]"):
        load_dataset(str(tmp_path / "dd"), "validation")


def test_save_to_disk_plain_dataset_with_string_labels(tmp_path):
    datasets.Dataset.from_dict({"text": ["s", "t", "u"], "label": ["spam", "ham", "spam"]}).save_to_disk(
        str(tmp_path / "ds"))
    train = load_dataset(str(tmp_path / "ds"), "train")  # no recorded split: it is the train split
    assert (train.labels, train.label_names) == ([1, 0, 1], ["ham", "spam"])
    with pytest.raises(ValueError, match=r"split 'test' not found"):
        load_dataset(str(tmp_path / "ds"), "test")


def test_save_to_disk_missing_column(tmp_path):
    datasets.Dataset.from_dict({"sentence": ["s"], "label": [0]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no column 'text'.*rename_column"):
        load_dataset(str(tmp_path / "ds"), "train")


# ---- errors name the field, the value and the fix ------------------------------------------------------


def test_missing_source_names_field_and_offline_fix(tmp_path):
    with pytest.raises(ValueError, match=r"data.source = 'imdb': no such folder") as e:
        load_dataset("imdb", "train")
    assert "offline" in str(e.value) and "save_to_disk" in str(e.value)
    with pytest.raises(ValueError, match="is a file"):
        load_dataset(str(AUSTEN / "train.jsonl"), "train")


def test_missing_split_and_columns(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(ValueError, match=r"split 'test' not found.*\['train'\].*test.jsonl"):
        load_dataset(str(tmp_path), "test")
    _jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": 0}, {"sentence": "y", "label": 1}])
    with pytest.raises(ValueError, match=r"train.jsonl:2: .*fields 'text' and 'label'"):
        load_dataset(str(tmp_path), "train")
    with (tmp_path / "test.csv").open("w") as f:
        f.write("text,target\nx,0\n")
    with pytest.raises(ValueError, match=r"no column 'label'"):
        load_dataset(str(tmp_path), "test")
    (tmp_path / "mixed").mkdir()
    _jsonl(tmp_path / "mixed" / "train.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": "b"}])
    with pytest.raises(ValueError, match=r"column 'label' holds \['int', 'str'\]"):
        load_dataset(str(tmp_path / "mixed"), "train")


# ---- partitions ----------------------------------------------------------------------------------------


def _entropy(row: list[int]) -> float:
    n = sum(row)
    return -sum(c / n * math.log(c / n) for c in row if c)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_disjoint_covering_and_seeded(austen_train, scheme):
    labels = austen_train.labels
    parts = partition(labels, 7, scheme, alpha=0.5, seed=3)
    flat = [i for p in parts for i in p]
    assert len(parts) == 7 and sorted(flat) == list(range(len(labels)))  # disjoint and covering
    assert all(len(p) >= 10 for p in parts)
    assert partition(labels, 7, scheme, alpha=0.5, seed=3) == parts
    assert partition(labels, 7, scheme, alpha=0.5, seed=4) != parts
    hist = label_histogram(labels, parts, 6)
    assert [sum(col) for col in zip(*hist, strict=True)] == [1973, 2135, 2284, 2565, 1226, 1198]
    assert [sum(row) for row in hist] == [len(p) for p in parts]


def test_iid_shares_are_equal_and_mixed(austen_train):
    parts = partition(austen_train.labels, 8, "iid", seed=0)
    assert {len(p) for p in parts} == {1422, 1423}
    assert parts[0] != list(range(1423))  # shuffled, not contiguous slices of the file


def test_dirichlet_small_alpha_is_skewed_and_respects_min_size(austen_train):
    labels = austen_train.labels
    iid = partition(labels, 10, "iid", seed=0)
    skewed = partition(labels, 10, "dirichlet", alpha=0.1, seed=0, min_partition_size=100)
    mean_h = [sum(map(_entropy, label_histogram(labels, p, 6))) / 10 for p in (iid, skewed)]
    global_h = _entropy(label_histogram(labels, [range(len(labels))], 6)[0])  # 1.756 nats, log(6) = 1.792
    assert mean_h[0] > 0.99 * global_h  # IID: every client sees about the global mix
    assert mean_h[1] < 0.6 * mean_h[0]
    assert min(map(len, skewed)) >= 100


@pytest.mark.parametrize(("n", "k", "seed"), [(100, 7, 0), (11381, 1000, 42), (50, 50, 3), (1000, 3, 1), (9, 4, 5)])
def test_iid_partitions_equal_flwr_datasets_iid_partitioner(n, k, seed):
    """The numpy path (cost independent of k) cuts the very shards flwr-datasets' IidPartitioner cuts."""
    from fedlora.data.partition import flwr_iid

    assert partition(list(range(n)), k, "iid", seed=seed) == flwr_iid(n, k, seed)


def test_dirichlet_reads_the_draw_once_and_equals_selecting_each_partition(austen_train):
    """The assignment read from the one draw equals flwr-datasets' public path (one Dataset select per
    partition), which took seconds per thousand partitions."""
    import warnings

    from flwr_datasets.partitioner import DirichletPartitioner

    fast = partition(austen_train.labels, 40, "dirichlet", alpha=0.5, seed=7, min_partition_size=5)
    n = len(austen_train.labels)
    public = DirichletPartitioner(num_partitions=40, partition_by="label", alpha=0.5, min_partition_size=5,
                                  shuffle=False, seed=7)
    public.dataset = datasets.Dataset.from_dict({"label": list(austen_train.labels), "index": list(range(n))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slow = [sorted(public.load_partition(i)["index"]) for i in range(40)]
    assert fast == slow


def test_dirichlet_unreachable_min_size_says_what_to_change():
    labels = [i % 2 for i in range(200)]
    with pytest.raises(ValueError, match=r"data.dirichlet-alpha=0.01.*raise data.dirichlet-alpha towards 1.0"):
        partition(labels, 10, "dirichlet", alpha=0.01, seed=2, min_partition_size=15)
    with pytest.raises(ValueError, match=r"data.min-partition-size = 30 .* needs 300 examples"):
        partition(labels, 10, "dirichlet", alpha=1.0, min_partition_size=30)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"scheme": "shards"}, "data.partition = 'shards'"),
    ({"num_partitions": 0}, "data.num-partitions = 0"),
    ({"num_partitions": 101}, "data.num-partitions = 101"),
    ({"scheme": "dirichlet", "alpha": 0.0}, "data.dirichlet-alpha = 0.0"),
])
def test_bad_partition_arguments_name_the_field(kwargs, field):
    args = {"labels": [0, 1] * 50, "num_partitions": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        partition(**args)


# ---- the tiny model's vocabulary ----------------------------------------------------------------------


def test_vocab_is_reproducible_and_laid_out():
    spec = importlib.util.spec_from_file_location("make_vocab", AUSTEN / "make_vocab.py")
    make_vocab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vocab)
    text = (AUSTEN / "vocab.json").read_text(encoding="utf-8")
    vocab = json.loads(text)
    assert text == make_vocab.render(make_vocab.build_vocab(make_vocab.train_texts()))
    assert len(vocab) == len(set(vocab)) == 4096
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert {"a", "##a", "z", "##z", "elizabeth", "darcy", "the"} <= set(vocab)


def test_tokenizer_round_trip_with_few_unks():
    from fedlora.models import tiny_tokenizer

    tok = tiny_tokenizer()
    assert len(tok) == 4096 and (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id) == (0, 1, 2)
    texts = load_dataset("austen", "test").texts[:300]
    ids = tok(texts)["input_ids"]
    assert all(i[0] == tok.cls_token_id and i[-1] == tok.sep_token_id for i in ids)
    n_tokens = sum(len(i) - 2 for i in ids)
    n_unk = sum(i.count(tok.unk_token_id) for i in ids)
    assert n_unk / n_tokens < 0.02
    normalize = tok.backend_tokenizer.normalizer.normalize_str
    for text, i in zip(texts, ids, strict=True):
        decoded = tok.decode(i, skip_special_tokens=True)
        assert "".join(decoded.split()) == "".join(normalize(text).split())

"""Build ``vocab.json``: a 4096-entry WordPiece vocabulary for the tiny default model, from ``train.jsonl``.

Why our own: the tiny model is trained from scratch, so a 30k-entry BERT vocabulary would spend most of its
parameters on an embedding table of unseen words; and nothing may be downloaded. The text is split exactly as
``BertTokenizerFast(do_lower_case=True)`` splits it (the same ``tokenizers`` normaliser and pre-tokeniser), so
every word kept here is found whole, and every other word falls back to its characters instead of ``[UNK]``.

Layout: the five special tokens (ids 0-4), every character seen, the same characters as ``##`` continuations,
then the most frequent words (ties broken alphabetically) up to ``SIZE``. Deterministic: re-running it gives a
byte-identical file. Usage: ``python make_vocab.py`` (writes ``vocab.json`` beside this script) or
``python make_vocab.py --check`` (exit status 1 if ``vocab.json`` is stale).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

HERE = Path(__file__).resolve().parent
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SIZE = 4096


def words(texts: Iterable[str]) -> Counter[str]:
    """Count pre-tokens the way BertTokenizerFast(do_lower_case=True) produces them."""
    normalizer, pre_tokenizer = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return counts


def build_vocab(texts: Iterable[str], size: int = SIZE) -> list[str]:
    counts = words(texts)
    chars = sorted({c for w in counts for c in w})
    vocab = SPECIALS + chars + ["##" + c for c in chars]
    if len(vocab) > size:
        raise ValueError(f"{len(vocab)} specials and characters do not fit in a vocabulary of {size}")
    taken = set(vocab)
    frequent = sorted((w for w in counts if w not in taken), key=lambda w: (-counts[w], w))
    return vocab + frequent[: size - len(vocab)]


def train_texts(path: Path = HERE / "train.jsonl") -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def render(vocab: list[str]) -> str:
    """JSON list, one token per line: a FAB (Flower's app bundle) ships .json but never .txt files."""
    return "[\n" + ",\n".join(json.dumps(t, ensure_ascii=False) for t in vocab) + "\n]\n"


def main(argv: list[str]) -> int:
    content = render(build_vocab(train_texts()))
    out = HERE / "vocab.json"
    if "--check" in argv:
        fresh = out.exists() and out.read_text(encoding="utf-8") == content
        print(f"{out}: {'up to date' if fresh else 'STALE: run python make_vocab.py'}")
        return 0 if fresh else 1
    out.write_text(content, encoding="utf-8", newline="\n")
    print(f"wrote {out} ({content.count(chr(10))} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

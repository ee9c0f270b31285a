"""Text for next-token training: load plain text or instruction data, split it among clients, tokenise it with
the loss mask.

Formats (``data.format``):
- ``text``: one document (paragraph) per example. The built-in "austen" corpus (its paragraphs; the novel is
  the group used by ``data.partition = "label"``), or a local folder with ``{split}.jsonl`` (the string field
  ``data.text-field``, optional ``label`` for grouping) or ``{split}.txt`` (one document per non-empty line).
- ``instruction``: a local folder with ``{split}.jsonl`` rows ``{"instruction": ..., "input": ... (optional),
  "response": ...}``. The prompt is rendered with the tokenizer's chat template when it has one (the user turn
  holds the instruction, then a blank line and the input), else with :data:`PROMPT_TEMPLATE`. Only the
  response tokens (and the end-of-turn/EOS tokens that close it) carry labels; prompt and padding are -100.

Labels are the input ids themselves (the model shifts them), with -100 where no loss is taken, as in
transformers. Packing (``data.packing``) concatenates the documents (each closed by EOS) and cuts the stream
into full ``max-length`` windows: no padding, documents attend across their boundaries (the usual
pre-training trade-off), and one example becomes one window.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE = -100
FORMATS = ("text", "instruction")
# Used when the tokenizer has no chat template (Alpaca-style; the "### Input" block only when input is given).
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
INPUT_BLOCK = "### Input:\n{input}\n\n"


@dataclass
class LMDataset:
    """One split. ``texts[i]`` is the document (format "text") or the response (format "instruction", then
    ``prompts[i]`` = (instruction, input)). ``labels[i]`` is a group id (the novel) for partitioning, not a
    training target; data without groups has one group."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    prompts: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} group labels")
        if self.prompts is not None and len(self.prompts) != len(self.texts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.texts)} responses")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> LMDataset:
        idx = list(indices)
        return LMDataset([self.texts[i] for i in idx], [self.labels[i] for i in idx], list(self.label_names),
                         None if self.prompts is None else [self.prompts[i] for i in idx])


# ---- loading ------------------------------------------------------------------------------------------------


def load_lm_dataset(source: str, split: str, fmt: str = "text", text_field: str = "text") -> LMDataset:
    """``split`` of ``source`` ("austen" or a local folder) in format ``fmt`` (see the module doc)."""
    from fedlora.data.loading import BUILTIN, load_dataset

    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not a format; use one of {FORMATS}")
    if source in BUILTIN:
        if fmt != "text":
            raise ValueError(f"data.source={source!r} is plain text; set data.format='text', or point "
                             "data.source at a folder of instruction JSONL files")
        ds = load_dataset(source, split)
        return LMDataset(list(ds.texts), list(ds.labels), list(ds.label_names))
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ValueError(f"data.source={source!r}: no such folder; use 'austen' or a folder holding "
                         f"{split}.jsonl (or {split}.txt for plain text)")
    jsonl, txt = folder / f"{split}.jsonl", folder / f"{split}.txt"
    if jsonl.is_file():
        return _from_rows(list(_rows(jsonl)), fmt, text_field)
    if txt.is_file() and fmt == "text":
        lines = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{txt} has no non-empty lines")
        return LMDataset(lines, [0] * len(lines), ["all"])
    want = f"{split}.jsonl" if fmt == "instruction" else f"{split}.jsonl or {split}.txt"
    raise ValueError(f"split {split!r} not found in data.source={source!r}: add {want} to {folder}")


def _rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: {line.strip()[:60]!r} is not a JSON object")
                yield f"{path}:{n}", row


def _from_rows(rows: list[tuple[str, dict[str, Any]]], fmt: str, text_field: str) -> LMDataset:
    if not rows:
        raise ValueError("the data file has no rows")
    texts: list[str] = []
    prompts: list[tuple[str, str]] = []
    for where, row in rows:
        if fmt == "text":
            value = row.get(text_field)
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {text_field!r} = {value!r:.60} is not a string; set "
                                 f"data.text-field to the field holding the text (fields: {sorted(row)})")
            texts.append(value)
        else:
            ins, inp, resp = row.get("instruction"), row.get("input", ""), row.get("response")
            if not isinstance(ins, str) or not isinstance(resp, str) or not isinstance(inp, str):
                raise ValueError(f"{where}: instruction data needs string fields 'instruction' and 'response' "
                                 f"(and optionally 'input'); got fields {sorted(row)}")
            prompts.append((ins, inp))
            texts.append(resp)
    groups = [row.get("label") for _, row in rows]
    if all(g is None for g in groups):
        labels, names = [0] * len(rows), ["all"]
    else:
        names = sorted({str(g) for g in groups})
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(g)] for g in groups]
    return LMDataset(texts, labels, names, prompts if fmt == "instruction" else None)


# ---- partitioning -------------------------------------------------------------------------------------------


def partition_by_label(labels: Sequence[int], num_partitions: int, num_labels: int) -> list[list[int]]:
    """Client k holds group k % num_labels; clients sharing a group split it into contiguous, near-equal
    shares; with fewer clients than groups, client k holds every group g with g % num_partitions == k.
    Six clients on the Austen corpus = one novel each: a natural non-IID split."""
    if num_partitions < 1:
        raise ValueError(f"num-partitions={num_partitions} must be >= 1")
    by_label: list[list[int]] = [[] for _ in range(num_labels)]
    for i, y in enumerate(labels):
        by_label[y].append(i)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    if num_partitions <= num_labels:
        for y, idx in enumerate(by_label):
            parts[y % num_partitions].extend(idx)
    else:
        for y, idx in enumerate(by_label):
            owners = [k for k in range(num_partitions) if k % num_labels == y]
            for j, k in enumerate(owners):
                parts[k] = idx[j * len(idx) // len(owners): (j + 1) * len(idx) // len(owners)]
    empty = [k for k, p in enumerate(parts) if not p]
    if empty:
        raise ValueError(f"data.partition='label' leaves partition(s) {empty} empty ({num_partitions} clients, "
                         f"{num_labels} groups); use fewer clients or data.partition='iid'")
    return [sorted(p) for p in parts]


# ---- tokenisation -------------------------------------------------------------------------------------------


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """End of a document: the EOS token, or [SEP] for BERT-style tokenizers (the tiny test tokenizer)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works (padding is masked in attention and loss); prefer the tokenizer's own."""
    for tid in (tokenizer.pad_token_id, eos_id(tokenizer), 0):
        if tid is not None:
            return tid
    return 0


def text_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Each document's ids with the tokenizer's own special tokens, closed by EOS (so the model learns to stop).
    One batched tokenizer call: per-text calls cost ~10x more on the fast tokenizers."""
    eos = eos_id(tokenizer)
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append(ids)
    return out


def render_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, input_: str = "") -> str:
    """The prompt text up to where the response starts (what generation is conditioned on)."""
    if tokenizer.chat_template:
        user = f"{instruction}\n\n{input_}" if input_ else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    block = INPUT_BLOCK.format(input=input_) if input_ else ""
    return PROMPT_TEMPLATE.format(instruction=instruction, input_block=block)


def instruction_ids(tokenizer: PreTrainedTokenizerBase, instruction: str, input_: str, response: str
                    ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids incl. the closing end-of-turn/EOS). Tokenised separately so the boundary is
    exact; generation later starts from exactly these prompt ids."""
    prompt = render_prompt(tokenizer, instruction, input_)
    if tokenizer.chat_template:
        user = f"{instruction}\n\n{input_}" if input_ else instruction
        full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the full "
                             "conversation; use a tokenizer without a chat template (the documented template)")
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return prompt_ids, list(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    resp = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = eos_id(tokenizer)
    return prompt_ids, resp + ([eos] if eos is not None else [])


def encode_lm(tokenizer: PreTrainedTokenizerBase, ds: LMDataset, max_length: int, packing: bool = False
              ) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (N, T), right-padded to the longest example (<=
    ``max_length``). Examples left without any label token by truncation (a prompt longer than max-length)
    are dropped; if none is left, that is an error naming the key to raise."""
    seqs: list[tuple[list[int], list[int]]] = []
    if ds.prompts is None:
        docs = text_ids(tokenizer, ds.texts)
        if packing:
            stream = [t for d in docs for t in d]
            windows = [stream[i:i + max_length] for i in range(0, len(stream), max_length)]
            full = [w for w in windows if len(w) == max_length] or windows[:1]  # drop the short tail window
            seqs = [(w, list(w)) for w in full]
        else:
            seqs = [(d[:max_length], d[:max_length]) for d in docs]
    else:
        if packing:
            raise ValueError("data.packing=true is for plain text; instruction data keeps one example per row")
        for (ins, inp), resp in zip(ds.prompts, ds.texts, strict=True):
            p, r = instruction_ids(tokenizer, ins, inp, resp)
            ids = (p + r)[:max_length]
            seqs.append((ids, ([IGNORE] * len(p) + r)[:max_length]))
    seqs = [(i, y) for i, y in seqs if sum(t != IGNORE for t in y[1:]) > 0]
    if not seqs:
        raise ValueError(f"no example keeps a target token within model.max-length={max_length}; raise it")
    width = max(len(i) for i, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id(tokenizer), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (i, y) in enumerate(seqs):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

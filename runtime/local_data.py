"""A device's local data: read JSONL/CSV rows, tokenize them, and form length-bucketed batches.

Torch-free: uses only the ``tokenizers`` library and numpy.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sftool.errors import SftoolError


@dataclass(frozen=True)
class Example:
    """One labelled text. ``sample_id`` is stable across epochs and devices' restarts."""

    sample_id: int
    text: str
    label: int


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise SftoolError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise SftoolError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            return rows
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError:
        raise SftoolError(f"{path} is not UTF-8 text") from None
    raise SftoolError(f"{path}: unsupported data format {suffix!r} (use .jsonl or .csv)")


def read_examples(
    path: Path,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    id_field: str = "id",
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """Read labelled examples from a JSONL or CSV file.

    Several text fields are joined with a newline (e.g. sentence pairs). Labels are integer
    ids, or names mapped through ``label_names``. Rows without ``id_field`` get their row index.
    """
    rows = _read_rows(Path(path))
    if not rows:
        raise SftoolError(f"{path} holds no rows")
    name_to_id = {name: i for i, name in enumerate(label_names or [])}
    examples = []
    for i, row in enumerate(rows):
        missing = [f for f in (*text_fields, label_field) if f not in row]
        if missing:
            raise SftoolError(f"{path}: row {i} lacks field(s) {missing} (have {sorted(row)})")
        raw_label = row[label_field]
        if isinstance(raw_label, str) and raw_label in name_to_id:
            label = name_to_id[raw_label]
        else:
            try:
                label = int(raw_label)
            except (TypeError, ValueError):
                raise SftoolError(
                    f"{path}: row {i} label {raw_label!r} is not an integer; pass the label names to map it"
                ) from None
        sample_id = int(row[id_field]) if id_field in row and row[id_field] != "" else i
        text = "\n".join(str(row[f]) for f in text_fields)
        examples.append(Example(sample_id, text, label))
    ids = [e.sample_id for e in examples]
    if len(set(ids)) != len(ids):
        raise SftoolError(f"{path}: sample ids in field {id_field!r} are not unique")
    return examples


class TextEncoder:
    """Tokenizes text into right-padded ``input_ids``/``attention_mask`` trimmed to the longest row."""

    def __init__(self, tokenizer_path: Path, max_len: int, pad_token_id: int):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise SftoolError(f"cannot load tokenizer {tokenizer_path}: {exc}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_len)
        self.max_len = max_len
        self.pad_token_id = pad_token_id

    def lengths(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._tok.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ids [B,T] and int64 mask [B,T], T = the longest row (padding costs compute and bytes)."""
        encodings = self._tok.encode_batch(list(texts))
        longest = max(1, max(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), longest), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), longest), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            if n == 0:  # an empty text still needs one position to pool from
                mask[row, 0] = 1
                continue
            ids[row, :n] = enc.ids
            mask[row, :n] = 1
        return ids, mask


def bucketed_batches(lengths: Sequence[int], batch_size: int, window: int = 8) -> list[list[int]]:
    """Group indices into batches of similar length.

    Sorting happens only within windows of ``window`` batches, so data order stays roughly the
    file's (a device streams; it should not need to see everything first) while padding within
    a batch shrinks. Every index appears exactly once.
    """
    if batch_size < 1:
        raise SftoolError("batch size must be >= 1")
    order: list[list[int]] = []
    span = batch_size * max(1, window)
    for start in range(0, len(lengths), span):
        chunk = sorted(range(start, min(start + span, len(lengths))), key=lambda i: (lengths[i], i))
        order.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return order


def iter_epochs(batches: list[list[int]], epochs: int, skip: Sequence[int] = ()) -> Iterator[tuple[int, list[int]]]:
    """(epoch, batch indices) for every epoch not in ``skip``."""
    for epoch in range(epochs):
        if epoch in skip:
            continue
        for batch in batches:
            yield epoch, batch

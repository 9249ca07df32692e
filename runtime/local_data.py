"""A device's local data: read JSONL/CSV rows, tokenize them, and form length-bucketed batches.

Torch-free: uses only the ``tokenizers`` library and numpy.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.protocol import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """One labelled text, or (causal LM) a prompt and its answer. ``sample_id`` is stable across
    epochs and devices' restarts."""

    sample_id: int
    text: str
    label: int
    #: The target text of a causal-LM example (``label`` is then -1): the loss covers its tokens only.
    answer: str | None = None


_INT_RE = re.compile(r"-?\d+")


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """Every row of a JSONL (``.jsonl``, ``.json``, ``.ndjson``) or CSV/TSV file, with where it
    stands (``line N``) for error messages. The one reader of user files, on devices and servers."""
    p = Path(path)
    if not p.is_file():
        raise SftoolError(f"no such data file: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix in (".jsonl", ".json", ".ndjson"):
            rows = list(_jsonl_rows(p))
        elif suffix in (".csv", ".tsv"):
            rows = list(_csv_rows(p, "\t" if suffix == ".tsv" else ","))
        else:
            raise SftoolError(f"{p}: unsupported format {suffix or '(no suffix)'}; use .jsonl or .csv")
    except UnicodeDecodeError:
        raise SftoolError(f"{p} is not UTF-8 text") from None
    if not rows:
        raise SftoolError(f"{p} holds no rows")
    return rows


def _jsonl_rows(p: Path) -> Iterator[tuple[str, dict]]:
    with open(p, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SftoolError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SftoolError(f"{p}:{n}: expected a JSON object per line")
            yield f"line {n}", row


def _csv_rows(p: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    with open(p, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise SftoolError(f"{p}: no header row")
        for row in reader:
            yield f"line {reader.line_num}", {k: v for k, v in row.items() if k is not None}


def as_int(v: Any) -> int | None:
    """An integer label or id (ints, integral floats, strings of digits), else None."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        return int(v.strip())
    return None


def labels_to_ids(raw: Sequence[Any], label_names: Sequence[str] | None, where: Path) -> tuple[list[int], list[str]]:
    """Label ids and names: names map through ``label_names`` (a value naming a label wins over
    reading it as an id); without names, integer labels are ids and other strings are numbered in
    sorted order. Every reader of labels in sftool goes through here, so ids always agree."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        if len(set(names)) != len(names) or not names:
            raise SftoolError(f"label names must be distinct and non-empty: {names}")
        index = {n: i for i, n in enumerate(names)}
        out = []
        for v in raw:
            i = index.get(str(v).strip()) if not isinstance(v, (int, float)) else None
            i = i if i is not None else as_int(v)
            if i is None or not 0 <= i < len(names):
                raise SftoolError(f"{where}: label {v!r} is not one of {names}")
            out.append(i)
        return out, names
    as_ints = [as_int(v) for v in raw]
    if all(i is not None for i in as_ints):
        if min(as_ints) < 0:
            raise SftoolError(f"{where}: integer labels must be >= 0 (found {min(as_ints)})")
        return as_ints, [str(i) for i in range(max(as_ints) + 1)]
    names = sorted({str(v).strip() for v in raw})
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v).strip()] for v in raw], names


def read_labelled(
    path: Path,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    id_field: str = "id",
    label_names: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Labelled examples of a JSONL/CSV file and the label names (see ``labels_to_ids``).

    Several text fields are joined with a newline (sentence pairs). A row's ``id_field``, when
    present, is its sample id (an integer); otherwise the 0-based row number is.
    """
    if not text_fields:
        raise SftoolError("give at least one text field (--text-field)")
    rows = read_rows(Path(path))
    texts, raw_labels, ids = [], [], []
    for i, (where, row) in enumerate(rows):
        for f in (*text_fields, label_field):
            if f not in row or row[f] is None:
                have = ", ".join(map(str, row)) or "nothing"
                raise SftoolError(f"{path}:{where}: no field {f!r} (row has {have})")
        texts.append("\n".join(str(row[f]) for f in text_fields))
        raw_labels.append(row[label_field])
        raw_id = row.get(id_field)
        sample_id = i if raw_id in (None, "") else as_int(raw_id)
        if sample_id is None:
            raise SftoolError(f"{path}:{where}: sample id {raw_id!r} in field {id_field!r} is not an integer")
        ids.append(sample_id)
    if len(set(ids)) != len(ids):
        raise SftoolError(f"{path}: sample ids in field {id_field!r} are not unique")
    labels, names = labels_to_ids(raw_labels, label_names, Path(path))
    return [Example(s, t, y) for s, t, y in zip(ids, texts, labels)], names


def read_examples(
    path: Path,
    text_fields: Sequence[str] = ("text",),
    label_field: str = "label",
    id_field: str = "id",
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """``read_labelled`` without the names: what a device or an evaluation reads."""
    return read_labelled(path, text_fields, label_field, id_field, label_names)[0]


#: Where the prompt goes in a prompt template (the model's chat format, rendered at export).
PROMPT_SLOT = "{prompt}"


def read_prompt_answer(
    path: Path,
    prompt_fields: Sequence[str] = ("question",),
    answer_field: str = "answer",
    id_field: str = "id",
    template: str | None = None,
) -> list[Example]:
    """Causal-LM examples of a JSONL/CSV file: the prompt (fields joined by a newline, put into
    ``template`` at ``{prompt}`` when given) and the answer to learn. Sample ids as in ``read_labelled``."""
    if template is not None and PROMPT_SLOT not in template:
        raise SftoolError(f"a prompt template needs the slot {PROMPT_SLOT}")
    rows = read_rows(Path(path))
    out = []
    for i, (where, row) in enumerate(rows):
        for f in (*prompt_fields, answer_field):
            if f not in row or row[f] is None:
                have = ", ".join(map(str, row)) or "nothing"
                raise SftoolError(f"{path}:{where}: no field {f!r} (row has {have})")
        prompt = "\n".join(str(row[f]) for f in prompt_fields)
        raw_id = row.get(id_field)
        sample_id = i if raw_id in (None, "") else as_int(raw_id)
        if sample_id is None:
            raise SftoolError(f"{path}:{where}: sample id {raw_id!r} in field {id_field!r} is not an integer")
        text = template.replace(PROMPT_SLOT, prompt) if template else prompt
        out.append(Example(sample_id, text, -1, str(row[answer_field])))
    if len({e.sample_id for e in out}) != len(out):
        raise SftoolError(f"{path}: sample ids in field {id_field!r} are not unique")
    return out


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

    def token_ids(self, texts: Sequence[str], special_tokens: bool = True) -> list[list[int]]:
        """Each text's token ids (truncated to ``max_len``); ``special_tokens=False`` leaves out what the
        tokenizer adds around a text (a BOS), as for an answer that continues a prompt."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=special_tokens)]

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


def encode_with_answers(
    encoder: TextEncoder, prompts: Sequence[str], answers: Sequence[str], eos_token_id: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask and token labels [B, T] (int64) of prompt + answer (+ EOS) rows, right-padded.

    Labels are the answer's token ids (and EOS) and ``IGNORE_INDEX`` at prompt and padding positions,
    so the loss covers the answer alone. A row longer than ``max_len`` loses the start of its prompt
    first (the answer and its final number matter more), then the end of its answer.
    """
    rows = []
    for prompt_ids, answer_ids in zip(encoder.token_ids(prompts), encoder.token_ids(answers, special_tokens=False)):
        answer_ids = list(answer_ids) + ([eos_token_id] if eos_token_id is not None else [])
        answer_ids = answer_ids[: encoder.max_len]
        prompt_ids = list(prompt_ids)[max(0, len(prompt_ids) + len(answer_ids) - encoder.max_len):]
        rows.append((prompt_ids, answer_ids))
    longest = max(1, max(len(p) + len(a) for p, a in rows))
    ids = np.full((len(rows), longest), encoder.pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.int64)
    labels = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
    for r, (prompt_ids, answer_ids) in enumerate(rows):
        n, m = len(prompt_ids), len(answer_ids)
        ids[r, : n + m] = prompt_ids + answer_ids
        mask[r, : max(1, n + m)] = 1
        labels[r, n : n + m] = answer_ids
    return ids, mask, labels


#: The tasks whose data this module reads: one label per row, or prompt and answer (causal LM).
TASKS = ("classification", "causal-lm")


def task_token_labels(task: str) -> bool:
    """Whether ``task`` carries token labels ([B, T]) rather than class ids; a one-line error if unknown.
    Devices and the server check ``--task`` here alike."""
    if task not in TASKS:
        raise SftoolError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    return task == "causal-lm"


def encode_examples(
    encoder: TextEncoder, rows: Sequence[Example], token_labels: bool = False, eos_token_id: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask and labels of a batch of examples, as a device sends them and the server evaluates
    them: [B] class ids, or (``token_labels``) [B, T] token labels of prompt + answer rows."""
    if token_labels:
        return encode_with_answers(encoder, [r.text for r in rows], [r.answer or "" for r in rows], eos_token_id)
    ids, mask = encoder.encode([r.text for r in rows])
    return ids, mask, np.array([r.label for r in rows], dtype=np.int64)


def example_lengths(encoder: TextEncoder, rows: Sequence[Example], token_labels: bool = False) -> list[int]:
    """Token counts the batch plan buckets by: the text, or prompt + answer (an estimate within a token
    or two of the encoded row, which is all bucketing needs; the plan stays deterministic)."""
    if token_labels:
        return [p + a for p, a in zip(encoder.lengths([r.text for r in rows]),
                                      encoder.lengths([r.answer or "" for r in rows]))]
    return encoder.lengths([r.text for r in rows])


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

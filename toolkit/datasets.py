"""Built-in data sets (SST-2, MRPC, RTE, GSM8K, MMLU subjects) and user data sets (JSONL / CSV).

Built-ins are read from the pinned assets in the cache (see :mod:`sftool.assets`): the GLUE sets
are Hugging Face ``save_to_disk`` folders whose ``.arrow`` files are Arrow IPC *streams*, read with
pyarrow alone; GSM8K is a gzipped JSONL of evaluation requests. ``mmlu-subjects`` asks which of 8
MMLU subjects a question (with its choices) is from; it reads the same kind of Arrow streams, one per
subject and split (``hails/mmlu_no_train/<subject>/{test,validation,dev}``), all rows of each.

Fixed train/eval re-split
-------------------------
The registries only carry GLUE *validation*, GSM8K *test* and MMLU *test/validation/dev* (no train),
so sftool re-splits each into train and eval, the same way on every machine:

* stratified by label (GSM8K: one stratum); labels are visited in ascending order;
* within a label, ids are sorted ascending and shuffled with ``numpy.random.default_rng(SPLIT_SEED)``
  (one generator for the whole split, ``SPLIT_SEED = 0``), never with Python's ``hash``;
* eval takes ``floor(EVAL_FRACTION * n_label + 0.5)`` of each label, ``EVAL_FRACTION = 0.25``.

Resulting sizes (train / eval, eval per label):

=============  =====  ===========  ========================================
data set       rows   train/eval   eval per label
=============  =====  ===========  ========================================
sst2           872    654 / 218    negative 107, positive 111
mrpc           408    306 / 102    not_equivalent 32, equivalent 70
rte            277    207 / 70     entailment 37, not_entailment 33
gsm8k          1319   989 / 330    (unlabelled)
mmlu-subjects  2567   1924 / 643   see below
=============  =====  ===========  ========================================

``mmlu-subjects`` per label (rows = train + eval), in label order:

==========================  ==========  ====  =====  ====
subject                     verbalizer  rows  train  eval
==========================  ==========  ====  =====  ====
high_school_biology         biology     347   260    87
high_school_mathematics     math        304   228    76
prehistory                  history     364   273    91
high_school_geography       geography   225   169    56
high_school_macroeconomics  economics   438   328    110
philosophy                  philosophy  350   262    88
nutrition                   nutrition   344   258    86
world_religions             religion    195   146    49
==========================  ==========  ====  =====  ====

Examples are plain dicts: ``{"id", "text", "label"}`` for classification (``text`` is the formatted
prompt for a decoder model), ``{"id", "text", "question", "answer", "short_answer"}`` for GSM8K.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sftool.runtime.local_data import read_labelled, read_rows

from .assets import ASSETS, assets_dir
from .errors import SftoolError

SPLIT_SEED = 0
EVAL_FRACTION = 0.25

Example = dict[str, Any]


# ------------------------------------------------------------------------------------------ built-ins


def _fmt_sst2(row: dict) -> str:
    return f"Review: {row['sentence'].strip()}\nSentiment:"


def _fmt_mrpc(row: dict) -> str:
    return (f"Sentence 1: {row['sentence1'].strip()}\nSentence 2: {row['sentence2'].strip()}\n"
            "Question: do they mean the same thing?\nAnswer:")


def _fmt_rte(row: dict) -> str:
    return (f"Premise: {row['sentence1'].strip()}\nHypothesis: {row['sentence2'].strip()}\n"
            "Question: does the premise entail the hypothesis?\nAnswer:")


def _fmt_mmlu(row: dict) -> str:
    # The choices stay in the prompt: many questions ("Which of the following is true?") name
    # their subject only through them, and with them every prompt of the set is distinct.
    choices = "\n".join(f"{letter}. {c.strip()}" for letter, c in zip(string.ascii_uppercase, row["choices"]))
    return f"Question: {row['question'].strip()}\n{choices}\nSubject:"


# MMLU subjects in label order: one per area of knowledge, with short questions (the history and law
# subjects are mostly passages of 1-3k characters) and 195-438 questions each.
MMLU_SUBJECTS = ("high_school_biology", "high_school_mathematics", "prehistory", "high_school_geography",
                 "high_school_macroeconomics", "philosophy", "nutrition", "world_religions")
# id = label * MMLU_ID_STRIDE + row number within the subject (its test, validation, dev rows, in
# that order): the files carry no ids, and this keeps ids unique and stable while the files are pinned.
MMLU_ID_STRIDE = 100_000


@dataclass(frozen=True)
class Builtin:
    """A built-in data set: where its asset lives and how its rows become prompts."""

    name: str
    asset: str  # key in sftool.assets.ASSETS
    task: str  # "classification" or "generation"
    label_names: tuple[str, ...] = ()
    # Answer words a decoder model scores, one per label (prepend a space when scoring).
    verbalizers: tuple[str, ...] = ()
    formatter: Callable[[dict], str] | None = field(default=None, repr=False)


# GLUE label ids follow the ClassLabel names in each dataset_info.json.
BUILTINS: dict[str, Builtin] = {
    "sst2": Builtin("sst2", "glue-sst2", "classification", ("negative", "positive"),
                    ("negative", "positive"), _fmt_sst2),
    "mrpc": Builtin("mrpc", "glue-mrpc", "classification", ("not_equivalent", "equivalent"),
                    ("no", "yes"), _fmt_mrpc),
    "rte": Builtin("rte", "glue-rte", "classification", ("entailment", "not_entailment"),
                   ("yes", "no"), _fmt_rte),
    "gsm8k": Builtin("gsm8k", "gsm8k", "generation"),
    # Verbalizers: distinct first words, since a multi-token verbalizer is scored by its first token.
    "mmlu-subjects": Builtin("mmlu-subjects", "mmlu-subjects", "classification", MMLU_SUBJECTS,
                             ("biology", "math", "history", "geography", "economics", "philosophy",
                              "nutrition", "religion"), _fmt_mmlu),
}


def builtin(name: str) -> Builtin:
    """The :class:`Builtin` called ``name``; :class:`SftoolError` if there is none."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise SftoolError(f"unknown data set {name!r}; built-in: {', '.join(BUILTINS)}") from None


def _asset_file(name: str, root: Path | None) -> Path:
    asset = ASSETS[builtin(name).asset]
    path = (root or assets_dir()) / asset.files[0].member
    if not path.is_file() and root is None:
        from .assets import fetch

        fetch([asset.name])  # on first need, with progress lines; pinned by size and sha256
    if not path.is_file():
        raise SftoolError(f"data set {name} is not in the cache ({path}); run: sftool assets fetch --only {asset.name}")
    return path


def load_builtin(name: str, root: Path | None = None) -> list[Example]:
    """All rows of built-in data set ``name``, sorted by id.

    ``root`` is the folder holding the assets' in-archive paths (default: the cache's ``assets/``).
    """
    b = builtin(name)
    if b.name == "mmlu-subjects":
        return _load_mmlu_subjects(b, root)
    path = _asset_file(name, root)
    if b.name == "gsm8k":
        return _load_gsm8k(path)
    rows = _read_hf_split(path.parent)
    out = [{"id": int(r["idx"]), "text": b.formatter(r), "label": int(r["label"])} for r in rows]
    out.sort(key=lambda e: e["id"])
    _check_unique_ids(out, name)
    return out


def _read_hf_split(folder: Path) -> list[dict]:
    """Rows of a ``save_to_disk`` split folder: its data files are Arrow IPC streams, not Arrow files."""
    import pyarrow as pa
    from pyarrow import ipc

    state = folder / "state.json"
    if state.is_file():
        names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    else:
        names = sorted(p.name for p in folder.glob("data-*.arrow"))
    tables = []
    for n in names:
        try:
            with pa.memory_map(str(folder / n)) as src:
                tables.append(ipc.open_stream(src).read_all())
        except (OSError, pa.ArrowInvalid) as e:
            raise SftoolError(f"cannot read {folder / n}: {e}") from e
    if not tables:
        raise SftoolError(f"no data files in {folder}")
    return pa.concat_tables(tables).to_pylist()


def _load_gsm8k(path: Path) -> list[Example]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                doc = json.loads(line)["doc"]
                out.append({"id": int(doc["id"]), "text": f"Question: {doc['question']}\nAnswer:",
                            "question": doc["question"], "answer": doc["answer"],
                            "short_answer": str(doc["short_answer"])})
    out.sort(key=lambda e: e["id"])
    _check_unique_ids(out, "gsm8k")
    return out


def _load_mmlu_subjects(b: Builtin, root: Path | None) -> list[Example]:
    """One example per MMLU question of the pinned subjects; label = the subject's index in ``label_names``.

    The pinned files (one Arrow stream per subject and split) are read in the asset's order; see
    :data:`MMLU_ID_STRIDE` for the ids.
    """
    asset = ASSETS[b.asset]
    base = root or assets_dir()
    missing = [base / f.member for f in asset.files if not (base / f.member).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise SftoolError(f"data set {b.name} is not in the cache ({missing[0]}{more}); "
                          f"run: sftool assets fetch --only {asset.name}")
    files: dict[str, list[Path]] = {}
    for f in asset.files:  # members are .../<subject>/<split>/data-*.arrow
        files.setdefault(Path(f.member).parent.parent.name, []).append(base / f.member)
    if tuple(files) != b.label_names:
        raise SftoolError(f"{b.name}: asset {asset.name} holds subjects {list(files)}, expected {list(b.label_names)}")
    out: list[Example] = []
    for label, subject in enumerate(b.label_names):
        rows = [r for path in files[subject] for r in _read_arrow_stream(path)]
        if len(rows) >= MMLU_ID_STRIDE:
            raise SftoolError(f"{b.name}: {subject} has {len(rows)} rows, too many for ids of stride {MMLU_ID_STRIDE}")
        for k, r in enumerate(rows):
            if r.get("subject", subject) != subject:  # a file of another subject under this name
                raise SftoolError(f"{b.name}: a row of {files[subject][0].parent.parent} is from {r['subject']!r}")
            out.append({"id": label * MMLU_ID_STRIDE + k, "text": b.formatter(r), "label": label})
    _check_unique_ids(out, b.name)
    return out


def _read_arrow_stream(path: Path) -> list[dict]:
    """Rows of one ``save_to_disk`` data file (an Arrow IPC stream); :class:`SftoolError` if unreadable."""
    import pyarrow as pa
    from pyarrow import ipc

    try:
        with pa.memory_map(str(path)) as src:
            return ipc.open_stream(src).read_all().to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
        raise SftoolError(f"cannot read {path}: {e}") from e


def _check_unique_ids(examples: Sequence[Example], what: str) -> None:
    dup = [i for i, c in Counter(e["id"] for e in examples).items() if c > 1]
    if dup:
        raise SftoolError(f"{what}: duplicate ids {dup[:5]}")


# -------------------------------------------------------------------------------------------- split


@dataclass
class Split:
    """A data set re-split into train and eval, with how it was made."""

    name: str
    train: list[Example]
    eval: list[Example]
    label_names: list[str]
    info: dict[str, Any]


def stratified_split(
    examples: Sequence[Example],
    eval_fraction: float = EVAL_FRACTION,
    seed: int = SPLIT_SEED,
    label_key: str = "label",
) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval), each sorted by id, holding out ``eval_fraction`` of every label.

    Deterministic across machines: one ``numpy.random.default_rng(seed)`` permutes each label's
    ascending ids, labels in ascending order. Examples without ``label_key`` form one stratum.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise SftoolError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    _check_unique_ids(examples, "data set")
    strata: dict[int, list[int]] = {}
    for e in examples:
        strata.setdefault(e.get(label_key, -1), []).append(e["id"])
    rng = np.random.default_rng(seed)
    held: set[int] = set()
    for label in sorted(strata):
        ids = np.array(sorted(strata[label]), dtype=np.int64)
        n_eval = math.floor(eval_fraction * len(ids) + 0.5)
        held.update(ids[rng.permutation(len(ids))[:n_eval]].tolist())
    ordered = sorted(examples, key=lambda e: e["id"])
    return [e for e in ordered if e["id"] not in held], [e for e in ordered if e["id"] in held]


def split_info(train: Sequence[Example], eval_: Sequence[Example], label_names: Sequence[str],
               eval_fraction: float = EVAL_FRACTION, seed: int = SPLIT_SEED) -> dict[str, Any]:
    """JSON-ready description of a re-split (seed, fraction, sizes, per-label counts)."""

    def per_label(xs: Sequence[Example]) -> dict[str, int]:
        c = Counter(e["label"] for e in xs if "label" in e)
        return {n: c.get(i, 0) for i, n in enumerate(label_names)}

    info: dict[str, Any] = {"seed": seed, "eval_fraction": eval_fraction, "stratified": True,
                            "train": len(train), "eval": len(eval_)}
    if label_names:
        info["train_per_label"] = per_label(train)
        info["eval_per_label"] = per_label(eval_)
    return info


def load_split(name: str, root: Path | None = None, eval_fraction: float = EVAL_FRACTION,
               seed: int = SPLIT_SEED) -> Split:
    """Built-in data set ``name`` with the fixed train/eval re-split (see the module docstring)."""
    b = builtin(name)
    train, eval_ = stratified_split(load_builtin(name, root), eval_fraction, seed)
    names = list(b.label_names)
    return Split(name, train, eval_, names, split_info(train, eval_, names, eval_fraction, seed))


# ---------------------------------------------------------------------------------------- user data

def load_user_data(
    path: str | os.PathLike,
    text_fields: Sequence[str],
    label_field: str,
    label_names: Sequence[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """A JSONL or CSV file as ``{"id", "text", "label"}`` examples, and the label names.

    Read by the one reader of user files (``sftool.runtime.local_data.read_labelled``), so the
    ids and label ids here are the ones a device reading the same file uses.
    """
    examples, names = read_labelled(Path(path), text_fields, label_field, label_names=label_names)
    return [{"id": e.sample_id, "text": e.text, "label": e.label} for e in examples], names


# ------------------------------------------------------------------------------------------- writing


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike) -> Path:
    """Write one JSON object per line (UTF-8), atomically; return the path."""
    p = Path(path)
    with _atomic_text(p) as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    return p


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Read a file written by :func:`write_jsonl`."""
    return [row for _, row in read_rows(Path(path))]


def write_label_map(label_names: Sequence[str], path: str | os.PathLike,
                    verbalizers: Sequence[str] | None = None) -> Path:
    """Write ``{"label_names": [...], "label2id": {...}}`` (+ ``verbalizers`` when known)."""
    data: dict[str, Any] = {"label_names": list(label_names),
                            "label2id": {n: i for i, n in enumerate(label_names)}}
    if verbalizers:
        data["verbalizers"] = list(verbalizers)
    p = Path(path)
    with _atomic_text(p) as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return p


def read_label_map(path: str | os.PathLike) -> list[str]:
    """Label names (index = label id) from a ``label_map.json``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        names = data["label_names"]
    except FileNotFoundError:
        raise SftoolError(f"no label map at {p}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SftoolError(f"{p} is not a label map ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SftoolError(f"{p}: label_names must be a list of strings")
    return names


class _atomic_text:
    """Write a text file through a temp file in the same folder, renamed in on success only."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            self.f.close()
            if exc_type is None:
                os.chmod(self.tmp, 0o644)
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)
        return False

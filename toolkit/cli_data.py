"""``sftool data ...``: re-split a data set and partition its train part across devices."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from . import datasets as ds
from .errors import SftoolError, exit_for
from .partitioners import label_count_table, label_counts, parse_scheme, partition

app = typer.Typer(help="Prepare data: fixed train/eval re-split and IID / non-IID device shards.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Data sets: built-in sst2, mrpc, rte, gsm8k, mmlu-subjects (from `sftool assets fetch`) or your JSONL/CSV."""


def make_split(
    dataset: str,
    n_devices: int,
    scheme: str,
    seed: int,
    out: Path,
    text_fields: list[str] | None = None,
    label_field: str | None = None,
    label_names: list[str] | None = None,
    eval_fraction: float = ds.EVAL_FRACTION,
) -> tuple[dict[str, Any], str]:
    """Write ``device-<i>.jsonl``, ``eval.jsonl``, ``label_map.json`` and ``partition.json`` to ``out``.

    ``dataset`` is a built-in name or a ``.jsonl``/``.csv`` path (then ``text_fields`` and
    ``label_field`` are required). The eval split is the fixed stratified re-split (seed
    ``ds.SPLIT_SEED``); ``seed`` drives only the device partition. Returns the partition.json
    content and the label-count table.
    """
    kind, _ = parse_scheme(scheme)  # fail on a bad scheme before reading any data
    verbalizers: list[str] | None = None
    if dataset in ds.BUILTINS:
        if text_fields or label_field:
            raise SftoolError(f"--text-field/--label-field apply to your own files, not built-in {dataset}")
        b = ds.builtin(dataset)
        examples = ds.load_builtin(dataset)
        names = list(b.label_names)
        verbalizers = list(b.verbalizers) or None
        source = f"builtin:{dataset}"
    else:
        path = Path(dataset)
        if not path.exists():
            raise SftoolError(f"{dataset!r} is neither a built-in data set ({', '.join(ds.BUILTINS)}) "
                              "nor an existing file")
        if not text_fields or not label_field:
            raise SftoolError("your own data needs --text-field (repeatable) and --label-field")
        examples, names = ds.load_user_data(path, text_fields, label_field, label_names)
        source = str(path.resolve())

    labelled = bool(names)
    if not labelled and kind != "iid":
        raise SftoolError(f"{dataset} has no labels: only --scheme iid applies")
    train, eval_ = ds.stratified_split(examples, eval_fraction, ds.SPLIT_SEED)
    labels = [e["label"] for e in train] if labelled else [0] * len(train)
    shards = partition(labels, n_devices, scheme, seed)
    table_names = names if labelled else ["examples"]

    out.mkdir(parents=True, exist_ok=True)
    for d, shard in enumerate(shards):
        ds.write_jsonl((train[i] for i in shard), out / f"device-{d}.jsonl")
    for stale in out.glob("device-*.jsonl"):  # from an earlier run with more devices
        m = re.fullmatch(r"device-(\d+)\.jsonl", stale.name)
        if m and int(m.group(1)) >= n_devices:
            stale.unlink()
    ds.write_jsonl(eval_, out / "eval.jsonl")
    ds.write_label_map(names, out / "label_map.json", verbalizers)
    summary: dict[str, Any] = {
        "dataset": dataset,
        "source": source,
        "scheme": scheme,
        "seed": seed,
        "n_devices": n_devices,
        "label_names": names,
        "split": ds.split_info(train, eval_, names, eval_fraction, ds.SPLIT_SEED),
        "counts": label_counts(shards, labels, table_names),
        "files": {**{f"device-{d}": f"device-{d}.jsonl" for d in range(n_devices)}, "eval": "eval.jsonl"},
    }
    (out / "partition.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary, label_count_table(shards, labels, table_names)


@app.command("split")
def split_cmd(
    dataset: Annotated[str, typer.Option(
        "--dataset", help="sst2, mrpc, rte, gsm8k, mmlu-subjects, or a path to your .jsonl/.csv file.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    devices: Annotated[int, typer.Option("--devices", min=1, help="Number of devices.")] = 3,
    scheme: Annotated[str, typer.Option(
        "--scheme", help="iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or labels:C (e.g. labels:1).")] = "iid",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the device partition.")] = 0,
    text_field: Annotated[list[str] | None, typer.Option(
        "--text-field", help="Text field of your file (repeatable; joined with newlines).")] = None,
    label_field: Annotated[str | None, typer.Option("--label-field", help="Label field of your file.")] = None,
    label_names: Annotated[str | None, typer.Option(
        "--label-names", help="Comma-separated label names in id order (default: sorted).")] = None,
    eval_fraction: Annotated[float, typer.Option(
        "--eval-fraction", help="Share of each label held out for eval (fixed seed 0).")] = ds.EVAL_FRACTION,
) -> None:
    """Write DIR/device-<i>.jsonl, eval.jsonl, label_map.json, partition.json; print the label counts."""
    names = [n.strip() for n in label_names.split(",")] if label_names else None
    try:
        summary, table = make_split(dataset, devices, scheme, seed, out, text_field, label_field, names,
                                    eval_fraction)
    except SftoolError as e:
        raise exit_for(e) from None
    sp = summary["split"]
    typer.echo(f"{dataset}: train {sp['train']} / eval {sp['eval']} (fixed stratified re-split, seed "
               f"{sp['seed']}); {scheme} over {devices} devices, seed {seed}")
    typer.echo(table)
    typer.echo(f"wrote {out}/device-0..{devices - 1}.jsonl, eval.jsonl, label_map.json, partition.json")


@app.command("list")
def list_cmd() -> None:
    """List the built-in data sets with their labels and re-split sizes (when fetched)."""
    width = max(6, *map(len, ds.BUILTINS))
    for name, b in ds.BUILTINS.items():
        try:
            info = ds.load_split(name).info
            sizes = f"train {info['train']:>4} / eval {info['eval']:>3}"
        except SftoolError:
            sizes = f"not fetched (sftool assets fetch --only {b.asset})"
        labels = ", ".join(b.label_names) or "(generation)"
        typer.echo(f"{name:{width}} {sizes:40} {labels}")

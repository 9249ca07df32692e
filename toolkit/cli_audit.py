"""``sftool audit ...``: what the activations of each split reveal to the server (docs/privacy.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .errors import SftoolError, exit_for

app = typer.Typer(help="Audit what the streamed activations reveal.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Audits an honest-but-curious server could run with the weights it holds."""


@app.command("privacy")
def privacy(
    artifacts: List[Path] = typer.Option(..., "--artifacts", help="Exported splits (each a `sftool export` folder, or a folder of split-* exports)."),
    data: Path = typer.Option(..., "--data", help="JSONL/CSV whose texts are audited (the private data)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for privacy_audit.json and the plots."),
    text_field: str = typer.Option("text", help="Field of --data holding the text."),
    sentences: int = typer.Option(30, help="Sentences of --data to audit (the first N)."),
    public: str = typer.Option(",".join(("mrpc", "rte", "gsm8k")), help="Public text for the learned inverter: built-in data sets or JSONL/CSV files (field text), comma list."),
    public_sentences: int = typer.Option(800, help="Public sentences to train the inverter on."),
    inverter_epochs: int = typer.Option(4, help="Training epochs of the learned inverter."),
    shortlist: int = typer.Option(64, help="Nearest-neighbour candidates per position by embedding cosine; 0 tries the whole vocabulary."),
    inverter_candidates: int = typer.Option(32, help="The inverter's top guesses added to the nearest-neighbour candidates."),
    optimisation_sentences: int = typer.Option(4, help="Sentences the optimisation attack runs on (its cost bound)."),
    optimisation_steps: int = typer.Option(100, help="Adam steps per sentence of the optimisation attack."),
    noise_ratio: float = typer.Option(0.0, "--noise-ratio", metavar="R", help="Audit devices that add noise ||noise||/||h|| = R (as `sftool device --noise-ratio`)."),
    clip: float = typer.Option(0.0, "--clip", metavar="C", help="Audit devices that clip to C and add N(0, (sigma C)^2)."),
    sigma: float = typer.Option(0.0, "--sigma", metavar="S", help="Noise multiplier of --clip."),
    threads: Optional[int] = typer.Option(None, help="torch and onnxruntime threads."),
) -> None:
    """Run nearest-neighbour, learned and optimisation inversion on each split; print a table, write JSON + plots."""
    try:
        _privacy(artifacts, data, out, text_field, sentences, public, public_sentences, inverter_epochs, shortlist,
                 inverter_candidates, optimisation_sentences, optimisation_steps, noise_ratio, clip, sigma, threads)
    except SftoolError as exc:
        raise exit_for(exc) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _privacy(artifacts, data, out, text_field, sentences, public, public_sentences, inverter_epochs, shortlist,
             inverter_candidates, optimisation_sentences, optimisation_steps, noise_ratio, clip, sigma, threads) -> None:
    from rich.console import Console
    from rich.table import Table
    from sftool.runtime.activation_noise import NoiseDefense

    console = Console(stderr=True, soft_wrap=True)

    for name, value, low in (("--sentences", sentences, 1), ("--public-sentences", public_sentences, 1),
                             ("--inverter-epochs", inverter_epochs, 1), ("--shortlist", shortlist, 0),
                             ("--inverter-candidates", inverter_candidates, 0),
                             ("--optimisation-sentences", optimisation_sentences, 0), ("--optimisation-steps", optimisation_steps, 1)):
        if value < low:
            raise SftoolError(f"{name} must be >= {low}")
    if not data.is_file():
        raise SftoolError(f"data file {data} does not exist")
    from sftool.privacy.audit import AuditSettings, cpu_name, run_audit, table_rows

    settings = AuditSettings(
        sentences=sentences, text_field=text_field, public=[p for p in public.split(",") if p],
        public_sentences=public_sentences, inverter_epochs=inverter_epochs, shortlist=shortlist or None,
        inverter_candidates=inverter_candidates, optimisation_sentences=optimisation_sentences,
        optimisation_steps=optimisation_steps, defense=NoiseDefense(ratio=noise_ratio, clip=clip, sigma=sigma),
        threads=threads,
    )
    results = run_audit(artifacts, data, settings, out, log=lambda m: console.print(f"[dim]audit:[/] {m}", highlight=False))
    table = Table(title=f"inversion of the activations ({settings.defense.wire()}; {results['sentences']} sentences; {cpu_name()})")
    for col in ("split k", "attack", "exact", "top-5", "BLEU>0.5 (n)", "seconds", "notes"):
        table.add_column(col, justify="right")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)
    if out is not None:
        typer.echo(f"wrote {out / 'privacy_audit.json'} and the plots")

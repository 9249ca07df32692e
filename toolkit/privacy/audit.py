"""`sftool audit privacy`: run the three inversion attacks on each exported split and report what an
honest-but-curious server recovers from the activations, with the cost of each attack.

Per split: (b) the learned inverter is trained first on public text (built-in data sets other than
the audited one, or a file); (a) nearest-neighbour recovery then searches, per position, the top
``shortlist`` tokens by embedding cosine united with the inverter's top ``inverter_candidates``
(``shortlist=None``: the whole vocabulary); (c) optimisation-based inversion runs on the first
``optimisation_sentences`` sentences only (it is the costliest per sentence). Metrics per attack:
token recovery (exact, top-5), the share of sentences recovered to sentence BLEU > 0.5 (whitespace
words of the decoded tokens, smoothed as in ``bleu.py``), mean BLEU, and the attack's seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.activation_noise import NoiseDefense
from sftool.runtime.files import cpu_name

#: Built-in data sets whose text the inverter trains on by default (none of them is SST-2).
DEFAULT_PUBLIC = ("mrpc", "rte", "gsm8k")
RESULTS_FILE = "privacy_audit.json"
#: What ``sftool profile --privacy-floor`` reads from each split's row: its best attack's exact recovery.
RECOVERY_KEY = "recovery_rate"


@dataclass
class AuditSettings:
    sentences: int = 30
    text_field: str = "text"
    public: Sequence[str] = DEFAULT_PUBLIC
    public_sentences: int = 800
    inverter_epochs: int = 4
    #: Nearest-neighbour candidates by embedding cosine per position; None tries the whole vocabulary.
    shortlist: int | None = 64
    #: The inverter's top guesses added to the nearest-neighbour candidates.
    inverter_candidates: int = 32
    optimisation_sentences: int = 4
    optimisation_steps: int = 100
    defense: NoiseDefense = field(default_factory=NoiseDefense)
    wire_dtype: str = "fp16"
    threads: int | None = None
    seed: int = 0


def read_texts(path: Path, text_field: str, limit: int | None = None) -> list[str]:
    """The ``text_field`` of each row of a JSONL/CSV file (the one reader), empty texts skipped."""
    from sftool.runtime.local_data import read_rows

    path = Path(path)
    if not path.is_file():
        raise SftoolError(f"data file {path} does not exist")
    texts = []
    for where, row in read_rows(path):
        if text_field not in row:
            raise SftoolError(f"{path}:{where}: no field {text_field!r} (row has {', '.join(map(str, row)) or 'nothing'})")
        if str(row[text_field]).strip():
            texts.append(str(row[text_field]))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise SftoolError(f"{path} has no text in field {text_field!r}")
    return texts


def public_texts(sources: Sequence[str], limit: int) -> list[str]:
    """Public sentences: the lines of built-in data sets with their field labels ("Premise: ") taken
    off, or the ``text`` of a file; round-robin over the sources, at most ``limit``."""
    from sftool.datasets import BUILTINS, load_builtin

    per_source = []
    for source in sources:
        if source in BUILTINS:
            lines = []
            for row in load_builtin(source):
                for line in row["text"].splitlines():
                    head, sep, rest = line.partition(": ")
                    text = rest if sep and len(head) < 16 else line
                    if text.strip() and not text.startswith(("do they mean", "does the premise")):
                        lines.append(text.strip())
            per_source.append(lines)
        else:
            per_source.append(read_texts(Path(source), "text"))
    out: list[str] = []
    for group in zip(*per_source):
        out.extend(group)
        if len(out) >= limit:
            break
    return out[:limit]


def _scores(target, sentences, guesses) -> dict:
    from sftool.privacy.bleu import sentence_bleu, words

    ids = np.concatenate([s.ids for s in sentences])
    predicted = np.concatenate([g.predicted for g in guesses])
    top5 = np.concatenate([g.top5 for g in guesses])
    bleus = [sentence_bleu(words(target.decode(s.ids)), words(target.decode(g.predicted))) for s, g in zip(sentences, guesses)]
    out = {
        "exact": float(np.mean(predicted == ids)),
        "top5": float(np.mean((top5 == ids[:, None]).any(axis=1))),
        "bleu_over_0_5": float(np.mean(np.array(bleus) > 0.5)),
        "mean_bleu": float(np.mean(bleus)),
        "sentences": len(sentences),
        "tokens": int(ids.size),
    }
    hits = [g.in_shortlist for g in guesses if g.in_shortlist is not None]
    if hits:
        out["shortlist_hit"] = float(np.mean(np.concatenate(hits)))
    return out


def audit_split(folder: Path, texts: Sequence[str], public: Sequence[str], settings: AuditSettings,
                log: Callable[[str], None] = print) -> dict:
    """The three attacks on one exported split; one result row."""
    import torch
    from sftool.privacy.inverter import train_inverter
    from sftool.privacy.nearest_neighbour import TokenGuesses, nearest_neighbour_attack
    from sftool.privacy.optimisation import optimisation_attack
    from sftool.privacy.target import AttackTarget

    torch.manual_seed(settings.seed)
    target = AttackTarget.from_export(folder, settings.defense, settings.wire_dtype, settings.threads)
    name = target.name
    started = time.perf_counter()
    audited = target.observe(texts)
    public_obs = target.observe(public)
    observe_s = time.perf_counter() - started
    log(f"{name}: {len(audited)} audited and {len(public_obs)} public sentences observed in {observe_s:.1f}s")

    inverter = train_inverter(target, public_obs, epochs=settings.inverter_epochs, seed=settings.seed,
                              on_epoch=lambda e, loss: log(f"{name}: inverter epoch {e + 1}/{settings.inverter_epochs}, loss {loss:.3f}"))
    t0 = time.perf_counter()
    inv_guesses = [TokenGuesses(top[:, 0].copy(), top) for top in (inverter.top(s.observed, 5) for s in audited)]
    inverter_row = {**_scores(target, audited, inv_guesses), "seconds": inverter.train_s + time.perf_counter() - t0,
                    "train_seconds": inverter.train_s, "train_tokens": inverter.train_tokens, "epochs": settings.inverter_epochs}
    log(f"{name}: inverter exact {inverter_row['exact']:.3f}, top-5 {inverter_row['top5']:.3f}")

    t0 = time.perf_counter()
    nn_guesses = []
    uses_inverter = settings.shortlist is not None and settings.inverter_candidates > 0
    for i, s in enumerate(audited):
        extra = inverter.top(s.observed, settings.inverter_candidates) if uses_inverter else None
        nn_guesses.append(nearest_neighbour_attack(target, s, settings.shortlist, extra))
        if (i + 1) % 5 == 0 or i + 1 == len(audited):
            log(f"{name}: nearest neighbour {i + 1}/{len(audited)} sentences, {time.perf_counter() - t0:.0f}s")
    search_s = time.perf_counter() - t0
    # Its cost includes the inverter's training when the inverter shortlists for it.
    nn_row = {**_scores(target, audited, nn_guesses), "seconds": search_s + (inverter.train_s if uses_inverter else 0.0),
              "search_seconds": search_s, "shortlist": settings.shortlist,
              "inverter_candidates": settings.inverter_candidates if uses_inverter else 0,
              "full_sweep": settings.shortlist is None}

    t0 = time.perf_counter()
    opt_sents = audited[: settings.optimisation_sentences]
    opt_guesses = []
    for i, s in enumerate(opt_sents):
        opt_guesses.append(optimisation_attack(target, s, settings.optimisation_steps))
        log(f"{name}: optimisation {i + 1}/{len(opt_sents)} sentences, {time.perf_counter() - t0:.0f}s")
    opt_row = ({**_scores(target, opt_sents, opt_guesses), "seconds": time.perf_counter() - t0,
                "steps": settings.optimisation_steps} if opt_sents else None)

    attacks = {"nearest_neighbour": nn_row, "inverter": inverter_row, "optimisation": opt_row}
    best = max(a["exact"] for a in attacks.values() if a is not None)
    return {"split": target.split, "artifacts": str(folder), "defense": settings.defense.wire(),
            RECOVERY_KEY: best, "attacks": attacks, "observe_seconds": observe_s}


def run_audit(folders: Sequence[Path], data: Path, settings: AuditSettings, out: Path | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Audit every split in ``folders`` (exports, or folders of split-* exports); write results and plots to ``out``."""
    import torch
    from sftool.runtime.profiler import find_exports

    exports = find_exports(list(folders))
    texts = read_texts(data, settings.text_field, settings.sentences)
    public = public_texts(settings.public, settings.public_sentences)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = {
        "data": str(data), "sentences": len(texts), "public": list(settings.public), "public_sentences": len(public),
        "settings": {**asdict(settings), "defense": settings.defense.wire(), "public": list(settings.public)},
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "splits": [],
    }
    for folder, _ in exports:
        results["splits"].append(audit_split(folder, texts, public, settings, log))
        if out is not None:
            write_results(results, Path(out))
    return results


def write_results(results: dict, out: Path) -> None:
    """``privacy_audit.json`` and the plots (one per split, one across splits) in ``out``."""
    from sftool.runtime.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_FILE, results)
    plot_results(results, out)


ATTACKS = ("nearest_neighbour", "inverter", "optimisation")


def plot_results(results: dict, out: Path) -> list[Path]:
    """A bar chart per split (exact, top-5, BLEU > 0.5 per attack) and recovery against k across splits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    metrics = ("exact", "top5", "bleu_over_0_5")
    for row in results["splits"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = [a for a in ATTACKS if row["attacks"].get(a)]
        for j, metric in enumerate(metrics):
            ax.bar(np.arange(len(names)) + (j - 1) * 0.27, [row["attacks"][a][metric] for a in names], 0.27, label=metric)
        ax.set_xticks(np.arange(len(names)), [a.replace("_", " ") for a in names])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"split {row['split']}: what the server recovers ({row['defense']})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"privacy_split{row['split']}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    rows = sorted(results["splits"], key=lambda r: r["split"])
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for a in ATTACKS:
            points = [(r["split"], r["attacks"][a]["exact"]) for r in rows if r["attacks"].get(a)]
            if points:
                ax.plot(*zip(*points), marker="o", label=a.replace("_", " "))
        ax.set_xlabel("split k (blocks on the device)")
        ax.set_ylabel("token recovery (exact)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "privacy_recovery.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def table_rows(results: dict) -> list[list[str]]:
    """One row per split and attack: split, attack, exact, top-5, BLEU>0.5, seconds."""
    rows = []
    for r in sorted(results["splits"], key=lambda r: r["split"]):
        for a in ATTACKS:
            m = r["attacks"].get(a)
            if m is None:
                continue
            note = ""
            if a == "nearest_neighbour":
                note = "full sweep" if m["full_sweep"] else f"C={m['shortlist']}+{m['inverter_candidates']}, in list {m.get('shortlist_hit', 1.0):.1%}"
            elif a == "optimisation":
                note = f"{m['steps']} steps"
            rows.append([str(r["split"]), a.replace("_", " "), f"{m['exact']:.3f}", f"{m['top5']:.3f}",
                         f"{m['bleu_over_0_5']:.2f} ({m['sentences']})", f"{m['seconds']:.0f}", note])
    return rows

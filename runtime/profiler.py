"""`sftool profile`: measure this device's forward time per split and recommend the deepest split
that meets a per-batch time budget. Torch-free: it times the exported ONNX models themselves.

Give it the exports of several splits (``sftool export --split 2,4,6,8`` writes one folder per
split). The time per batch is close to linear in k (embedding cost + k x block cost), so a
least-squares line over the measured splits gives the per-block cost and predicts the others.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from sftool.runtime.onnx_model import DeviceModel, choose_variant


@dataclass
class SplitTiming:
    split: int
    variant: str
    median_ms: float


@dataclass
class ProfileResult:
    timings: list[SplitTiming]
    embed_ms: float
    block_ms: float
    num_layers: int
    budget_ms: float
    recommended_exported: int | None  # deepest exported split within the budget
    recommended_fit: int  # deepest split the linear fit says fits (could be exported next)


def find_exports(paths: list[Path]) -> list[tuple[Path, Manifest]]:
    """Artifacts folders among ``paths`` (each an export, or a folder of split-* exports)."""
    found = []
    for path in paths:
        path = Path(path)
        candidates = [path] if (path / MANIFEST_NAME).is_file() else sorted(p for p in path.glob("*") if (p / MANIFEST_NAME).is_file())
        found += [(c, load_manifest(c, verify_files=False)) for c in candidates]
    if not found:
        raise SftoolError(f"no sftool exports in {', '.join(map(str, paths))}")
    sources = {(m.family, m.source, m.num_layers) for _, m in found}
    if len(sources) > 1:
        raise SftoolError("the exports come from different models; profile one model at a time")
    return sorted(found, key=lambda fm: fm[1].split)


def profile_splits(
    paths: list[Path],
    budget_ms: float,
    batch_size: int = 8,
    seq_len: int = 64,
    precision: str = "auto",
    threads: int | None = None,
    repeats: int = 7,
) -> ProfileResult:
    from tokenizers import Tokenizer

    exports = find_exports(paths)
    folder, manifest = exports[0]
    vocab = Tokenizer.from_file(str(folder / manifest.tokenizer_file)).get_vocab_size()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(batch_size, seq_len)).astype(np.int64)
    mask = np.ones((batch_size, seq_len), dtype=np.int64)
    models = []
    for folder, manifest in exports:
        variant = choose_variant(manifest, precision)
        models.append((manifest.split, variant, DeviceModel(folder, manifest, variant, threads=threads)))
        models[-1][2].forward(ids[:1, :8], mask[:1, :8])  # warm-up: allocations, lazy init
    samples: dict[int, list[float]] = {k: [] for k, _, _ in models}
    for _ in range(repeats):
        for split, _, model in models:  # interleaved, so load swings hit every split alike
            started = time.perf_counter()
            model.forward(ids, mask)
            samples[split].append((time.perf_counter() - started) * 1000)
    timings = [SplitTiming(k, v.label, statistics.median(samples[k])) for k, v, _ in models]
    ks = np.array([t.split for t in timings], dtype=float)
    ms = np.array([t.median_ms for t in timings])
    if len(timings) >= 2:
        block_ms, embed_ms = np.polyfit(ks, ms, 1)
    else:
        embed_ms, block_ms = 0.0, ms[0] / ks[0]
    block_ms = max(float(block_ms), 1e-6)
    num_layers = exports[0][1].num_layers
    within = [t.split for t in timings if t.median_ms <= budget_ms]
    fit = int(min(num_layers - 1, max(0, np.floor((budget_ms - embed_ms) / block_ms))))
    return ProfileResult(timings, float(embed_ms), block_ms, num_layers, budget_ms, max(within) if within else None, fit)


@dataclass
class PrivacyFloor:
    """The shallowest audited split whose measured token recovery is under a floor."""

    floor: float
    #: split k -> the best attack's exact token recovery (``sftool audit privacy``'s ``recovery_rate``).
    rates: dict[int, float]
    recommended: int | None


def privacy_floor(audit_file: Path, floor: float) -> PrivacyFloor:
    """Read an audit's results (``privacy_audit.json``) and pick the shallowest split with recovery < ``floor``."""
    import json

    if not 0.0 < floor <= 1.0:
        raise SftoolError(f"--privacy-floor is a recovery rate in (0, 1], not {floor:g}")
    try:
        results = json.loads(Path(audit_file).read_text())
        rates = {int(r["split"]): float(r["recovery_rate"]) for r in results["splits"]}
    except OSError as exc:
        raise SftoolError(f"cannot read the audit results {audit_file}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise SftoolError(f"{audit_file} is not the privacy_audit.json of `sftool audit privacy`") from None
    under = sorted(k for k, rate in rates.items() if rate < floor)
    return PrivacyFloor(floor, rates, under[0] if under else None)

"""Split one training set across simulated devices, IID or non-IID.

Schemes (the ``--scheme`` strings):

* ``iid`` — a seeded shuffle cut into near-equal shards (sizes differ by at most one).
* ``dirichlet:ALPHA`` — for every label, device proportions drawn from ``Dirichlet(ALPHA)``;
  small ALPHA (0.1) gives very skewed devices, large ALPHA (100) nearly IID. If a device ends up
  empty while others hold two or more samples, samples are moved to it from the largest shard.
* ``labels:C`` — every device holds C labels, assigned round-robin over the sorted labels
  (device d gets labels d*C, d*C+1, ... modulo the number of labels); each label's samples are
  shuffled and cut evenly among the devices that hold it. ``labels:1`` with 3 devices and 2 labels:
  device 0 and 2 share label 0, device 1 holds label 1.

Every sample lands on exactly one device. Randomness comes only from
``numpy.random.default_rng(seed)``, so a (labels, n_devices, scheme, seed) tuple always gives the
same shards.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import SftoolError

SCHEMES = ("iid", "dirichlet:ALPHA", "labels:C")


def parse_scheme(scheme: str) -> tuple[str, float | int | None]:
    """``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``; ``"labels:1"`` -> ``("labels", 1)``; ``"iid"`` -> ``("iid", None)``."""
    s = scheme.strip().lower()
    kind, _, arg = s.partition(":")
    try:
        if kind == "iid" and not arg:
            return "iid", None
        if kind == "dirichlet" and arg:
            alpha = float(arg)
            if alpha > 0 and np.isfinite(alpha):
                return "dirichlet", alpha
        if kind == "labels" and arg:
            c = int(arg)
            if c >= 1:
                return "labels", c
    except ValueError:
        pass
    raise SftoolError(f"bad partition scheme {scheme!r}; use one of: iid, dirichlet:ALPHA (ALPHA > 0, "
                      "e.g. dirichlet:0.5), labels:C (C >= 1, e.g. labels:1)")


def partition(labels: Sequence[int], n_devices: int, scheme: str, seed: int) -> list[list[int]]:
    """Assign sample indices ``0..len(labels)-1`` to ``n_devices`` shards (each sorted ascending)."""
    kind, arg = parse_scheme(scheme)
    if n_devices < 1:
        raise SftoolError(f"need at least one device, got {n_devices}")
    y = np.asarray(labels, dtype=np.int64)
    if y.ndim != 1:
        raise SftoolError("labels must be a flat sequence of integers")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        shards = [s.tolist() for s in np.array_split(rng.permutation(len(y)), n_devices)]
    elif kind == "dirichlet":
        shards = _dirichlet(y, n_devices, float(arg), rng)
    else:
        shards = _by_labels(y, n_devices, int(arg), rng)
    return [sorted(s) for s in shards]


def _dirichlet(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    shards: list[list[int]] = [[] for _ in range(n)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        p = rng.dirichlet(np.full(n, alpha))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx) + 0.5).astype(int)
        for d, part in enumerate(np.split(idx, cuts)):
            shards[d].extend(part.tolist())
    # Small alphas leave devices empty; an empty device cannot train, so lend it one sample.
    while True:
        empty = [d for d, s in enumerate(shards) if not s]
        big = max(range(n), key=lambda d: len(shards[d]))
        if not empty or len(shards[big]) < 2:
            return shards
        take = int(rng.integers(len(shards[big])))
        shards[empty[0]].append(shards[big].pop(take))


def _by_labels(y: np.ndarray, n: int, c: int, rng: np.random.Generator) -> list[list[int]]:
    classes = np.unique(y)
    k = len(classes)
    if k == 0:
        return [[] for _ in range(n)]
    c = min(c, k)
    if n * c < k:
        raise SftoolError(f"labels:{c} with {n} devices covers only {n * c} of {k} labels; "
                          f"use at least {-(-k // c)} devices or more labels per device")
    holders: dict[int, list[int]] = {}
    for d in range(n):
        for j in range(c):
            holders.setdefault(int(classes[(d * c + j) % k]), []).append(d)
    shards: list[list[int]] = [[] for _ in range(n)]
    for label in classes:
        devs = holders[int(label)]
        idx = rng.permutation(np.flatnonzero(y == label))
        for d, part in zip(devs, np.array_split(idx, len(devs))):
            shards[d].extend(part.tolist())
    return shards


def label_counts(shards: Sequence[Sequence[int]], labels: Sequence[int],
                 label_names: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{"device-0": {"negative": 10, "positive": 3, "total": 13}, ..., "total": {...}}``."""
    y = np.asarray(labels, dtype=np.int64)
    n_labels = max(len(label_names), int(y.max()) + 1 if len(y) else 0)
    names = [label_names[i] if i < len(label_names) else str(i) for i in range(n_labels)]
    out: dict[str, dict[str, int]] = {}
    total = np.zeros(n_labels, dtype=np.int64)
    for d, shard in enumerate(shards):
        counts = np.bincount(y[np.asarray(shard, dtype=np.int64)], minlength=n_labels)
        total += counts
        out[f"device-{d}"] = {**{n: int(v) for n, v in zip(names, counts)}, "total": int(counts.sum())}
    out["total"] = {**{n: int(v) for n, v in zip(names, total)}, "total": int(total.sum())}
    return out


def label_count_table(shards: Sequence[Sequence[int]], labels: Sequence[int],
                      label_names: Sequence[str]) -> str:
    """A plain-text table of samples per device and label, with a total row and column."""
    counts = label_counts(shards, labels, label_names)
    cols = list(next(iter(counts.values())))
    rows = [["device", *cols]] + [[name, *(str(v[c]) for c in cols)] for name, v in counts.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)

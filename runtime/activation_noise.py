"""Gaussian noise on a device's activations, added before they leave the device (torch-free).

Two forms, both per real token (padding rows stay exact zeros):

- **ratio** ``R``: ``h + N(0, s^2 I)`` with ``s = R * ||h|| / sqrt(H)``, so ``E||noise||^2 = R^2 ||h||^2``
  and, H being in the hundreds, ``||noise|| / ||h||`` is ``R`` within a few percent for every token.
  A utility knob with no formal guarantee: the scale follows the token's own norm.
- **clip** ``C`` with noise multiplier ``sigma``: ``h * min(1, C / ||h||) + N(0, (sigma * C)^2 I)``, the
  Gaussian mechanism on a bounded vector, which gives each sample a differential-privacy budget
  (:func:`gaussian_epsilon`).

The description travels in HELLO's ``defense`` field (``none``, ``gauss:ratio=R``,
``gauss:clip=C,sigma=S``); :func:`parse_defense` reads it back, ``NoiseDefense.wire`` writes it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from sftool.errors import SftoolError

#: HELLO's ``defense`` when the device adds nothing.
NO_DEFENSE = "none"
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
#: The grammar of HELLO's ``defense`` field (runtime/protocol.py checks a HELLO against it).
DEFENSE_PATTERN = re.compile(rf"none|gauss:ratio=({_NUMBER})|gauss:clip=({_NUMBER}),sigma=({_NUMBER})")


@dataclass(frozen=True)
class NoiseDefense:
    """What noise a device adds. ``ratio`` > 0, or ``clip`` > 0 with ``sigma`` >= 0; all zero: none."""

    ratio: float = 0.0
    clip: float = 0.0
    sigma: float = 0.0
    #: Seed of the device's noise generator (None: fresh OS entropy, what a real device should use).
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("ratio", "clip", "sigma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise SftoolError(f"--{'noise-ratio' if name == 'ratio' else name} must be a finite number >= 0, not {value:g}")
        if self.ratio > 0 and self.clip > 0:
            raise SftoolError("--noise-ratio and --clip are two forms of the noise: give one of them")
        if self.sigma > 0 and self.clip == 0:
            raise SftoolError("--sigma is the noise multiplier of --clip: give --clip C as well")

    @property
    def active(self) -> bool:
        return self.ratio > 0 or self.clip > 0

    def wire(self) -> str:
        """HELLO's ``defense`` value."""
        if self.ratio > 0:
            return f"gauss:ratio={self.ratio:g}"
        if self.clip > 0:
            return f"gauss:clip={self.clip:g},sigma={self.sigma:g}"
        return NO_DEFENSE

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def apply(self, hidden: np.ndarray, attention_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``hidden`` [B, T, H] fp32 with this defense applied to its real tokens (a new array)."""
        if not self.active:
            return hidden
        h = hidden.astype(np.float32, copy=True)
        real = attention_mask.astype(bool)
        tokens = h[real]  # [N, H]
        norms = np.linalg.norm(tokens, axis=-1, keepdims=True)
        if self.ratio > 0:
            scale = self.ratio * norms / math.sqrt(h.shape[-1])
        else:
            tokens = tokens * np.minimum(1.0, self.clip / np.maximum(norms, 1e-30))
            scale = np.full_like(norms, self.sigma * self.clip)
        h[real] = tokens + scale * rng.standard_normal(tokens.shape, dtype=np.float32)
        return h


def parse_defense(text: str) -> NoiseDefense:
    """A HELLO ``defense`` value back as a NoiseDefense (ValueError if it does not follow the grammar)."""
    match = DEFENSE_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"defense {text!r} is not none, gauss:ratio=R or gauss:clip=C,sigma=S")
    ratio, clip, sigma = match.groups()
    if ratio is not None:
        return NoiseDefense(ratio=float(ratio))
    if clip is not None:
        return NoiseDefense(clip=float(clip), sigma=float(sigma))
    return NoiseDefense()


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of the Gaussian mechanism whose sensitivity / noise std is ``mu`` (Balle and Wang
    2018, Theorem 8, exact for every epsilon >= 0): Phi(mu/2 - eps/mu) - e^eps * Phi(-mu/2 - eps/mu)."""
    if mu <= 0:
        return 0.0
    tail = _normal_cdf(-mu / 2 - epsilon / mu)
    return _normal_cdf(mu / 2 - epsilon / mu) - (math.exp(epsilon) * tail if tail > 0 else 0.0)


def gaussian_epsilon(sigma: float, tokens: int, releases: int = 1, delta: float = 1e-5) -> float:
    """Per-sample epsilon at ``delta`` of the clipped-noise defense for a sample of ``tokens`` tokens
    sent ``releases`` times (epochs without the activation cache), each with fresh noise.

    Assumptions: neighbouring data sets differ in one sample, replaced by any other of the same
    length (the length travels in the attention mask and is not protected, nor is the label).
    Each token vector is clipped to L2 norm C, so replacing a sample moves each of its token vectors
    by at most 2C and its whole activation (``tokens`` vectors, ``releases`` times) by at most
    ``2C sqrt(tokens * releases)``; the noise std is ``sigma * C``, so the mechanism's
    sensitivity-to-noise ratio is ``mu = 2 sqrt(tokens * releases) / sigma``, and epsilon is the
    smallest value with ``gaussian_delta(epsilon, mu) <= delta`` (found by bisection). Returns inf
    for ``sigma`` = 0.
    """
    if sigma <= 0:
        return math.inf
    mu = 2.0 * math.sqrt(tokens * releases) / sigma
    if gaussian_delta(0.0, mu) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, mu) > delta:
        lo, hi = hi, hi * 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if gaussian_delta(mid, mu) > delta else (lo, mid)
    return hi

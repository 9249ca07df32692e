"""Choosing the next token (greedy, or sampled with temperature and top-p) and when to stop. Torch-free:
every decoding path hands over its logits as numpy, so one rule chooses for all of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from sftool.errors import SftoolError
from sftool.gsm8k import answer_line_completed


@dataclass
class Sampler:
    """Greedy at ``temperature`` 0, else a draw from softmax(logits / temperature) cut to the smallest set of
    tokens whose probability reaches ``top_p``. One seeded generator per sampler: a run is reproducible."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise SftoolError(f"--temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SftoolError(f"--top-p must be in (0, 1], not {self.top_p}")
        self._rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def choose(self, logits: np.ndarray) -> int:
        """The next token id from the last position's logits [V]."""
        if self.greedy:
            return int(np.argmax(logits))
        scaled = np.asarray(logits, dtype=np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        # Keep the tokens before the cumulative probability reaches top_p, and the one that reaches it.
        keep = int(np.searchsorted(np.cumsum(probs[order]), self.top_p)) + 1
        kept = order[:keep]
        return int(self._rng.choice(kept, p=probs[kept] / probs[kept].sum()))


@dataclass
class StopRule:
    """Stop at an end-of-sequence token, or (``answer_line``) once a ``#### N`` line is complete."""

    eos_token_ids: frozenset[int]
    answer_line: bool = True

    @classmethod
    def of(cls, eos_token_ids: Iterable[int | None], answer_line: bool = True) -> StopRule:
        return cls(frozenset(int(t) for t in eos_token_ids if t is not None), answer_line)

    def reason(self, token: int, text: str) -> str | None:
        """Why generation stops after ``token`` (``text``: everything generated so far), or None."""
        if token in self.eos_token_ids:
            return "eos"
        if self.answer_line and answer_line_completed(text):
            return "answer"
        return None

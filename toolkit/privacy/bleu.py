"""Sentence BLEU (Papineni et al. 2002) with add-one smoothing of the 2- to 4-gram precisions.

Smoothing: Lin and Och (2004), "smoothing 2" in Chen and Cherry's (2014) list: for n > 1 both the
matched and the total n-gram counts get +1, so one short sentence without a matching 4-gram does
not score 0. Unigram precision is not smoothed. Uniform weights over n = 1..4 and the usual brevity
penalty exp(1 - r/c) when the hypothesis is shorter than the reference.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence[str], hypothesis: Sequence[str], max_n: int = 4) -> float:
    """BLEU of one hypothesis against one reference (token lists), in [0, 1]."""
    if not hypothesis or not reference:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matched = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = max(len(hypothesis) - n + 1, 0)
        if n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0 or total == 0:
            return 0.0
        log_sum += math.log(matched / total) / max_n
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c >= r else math.exp(1 - r / c)
    return brevity * math.exp(log_sum)


def words(text: str) -> list[str]:
    """Whitespace words, the unit the BLEU figures count."""
    return text.split()

"""Optimisation-based inversion: find input embeddings whose output through the frozen blocks matches
the observed hidden states, then read each position's nearest token.

The relaxed input is one free vector per position (continuous, not tied to a token), started at the
mean embedding row; Adam minimises the mean over positions of the relative squared error
||f(x)_t - h_t||^2 / ||h_t||^2 through the shadow part (its weights frozen). The cost is bounded by
``steps`` per sentence (the audit also bounds the number of sentences); each step is one forward and
one backward pass of the k blocks over the sentence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sftool.privacy.nearest_neighbour import TokenGuesses
from sftool.privacy.target import AttackTarget, Sentence


def optimisation_attack(target: AttackTarget, sentence: Sentence, steps: int = 100, lr: float = 1.0) -> TokenGuesses:
    """Recover ``sentence``'s tokens by optimising its input embeddings (``lr`` is relative to the rows' RMS)."""
    observed = torch.from_numpy(sentence.observed).float()[None]
    table = target.embedding.float()
    rms = float(table.pow(2).mean().sqrt())
    x = table.mean(0).expand_as(observed).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr * rms)
    weight = 1.0 / observed.pow(2).sum(-1).clamp_min(1e-12)
    positions = torch.arange(observed.shape[1])[None]
    for _ in range(steps):
        out = target.shadow_forward(inputs_embeds=x, position_ids=positions)
        loss = ((out - observed).pow(2).sum(-1) * weight).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = F.normalize(x[0], dim=-1) @ F.normalize(table, dim=-1).T
        top = torch.topk(scores, 5, dim=-1).indices.numpy()
    return TokenGuesses(top[:, 0].copy(), top)

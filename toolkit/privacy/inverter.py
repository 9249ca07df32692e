"""A learned inversion model: a small MLP from one position's hidden state to its token, trained on
public text run through the same device part (and the same defense: HELLO tells the server which).

Architecture: LayerNorm -> Linear(H, 2H) -> GELU -> Linear(2H, H), then a scaled cosine against the
frozen token embedding table, so it scores every vocabulary token, also ones the public text never
had. Training's softmax runs over the tokens of the public text only (the public vocabulary), which
on SmolLM2 is about a tenth of the table and keeps a CPU epoch in seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sftool.privacy.target import AttackTarget, Sentence
from torch import nn


class InverterNet(nn.Module):
    """hidden [N, H] -> scores over the rows of a token table [V, H]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.log_scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * F.normalize(self.mlp(hidden), dim=-1) @ table.T


@dataclass
class Inverter:
    """A trained inverter over one split's states."""

    net: InverterNet
    table: torch.Tensor  # normalized embedding rows [V, H]
    train_tokens: int
    train_s: float
    final_loss: float

    @torch.no_grad()
    def top(self, observed: np.ndarray, k: int) -> np.ndarray:
        """[T, k] best token ids per position, best first."""
        scores = self.net(torch.from_numpy(observed).float(), self.table)
        return torch.topk(scores, min(k, scores.shape[-1]), dim=-1).indices.numpy()


def train_inverter(target: AttackTarget, public: Sequence[Sentence], epochs: int = 4, batch: int = 512,
                   lr: float = 2e-3, seed: int = 0, on_epoch: Callable[[int, float], None] | None = None) -> Inverter:
    """Fit an inverter on ``public`` sentences (observed through ``target``, noise included)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    states = torch.from_numpy(np.concatenate([s.observed for s in public])).float()
    ids = torch.from_numpy(np.concatenate([s.ids for s in public])).long()
    vocab, local = torch.unique(ids, return_inverse=True)
    table = F.normalize(target.embedding.float(), dim=-1)
    net = InverterNet(table.shape[1])
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(ids), generator=generator)
        total, count = 0.0, 0
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            loss = F.cross_entropy(net(states[rows], table[vocab]), local[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(rows), count + len(rows)
        loss_value = total / max(count, 1)
        if on_epoch:
            on_epoch(epoch, loss_value)
    net.eval()
    return Inverter(net, table, int(len(ids)), time.perf_counter() - started, loss_value)

"""Nearest-neighbour token recovery: which token, run through the device part at this position after
the prefix recovered so far, gives the hidden state nearest (L2) to the observed one?

At k = 0 the device part is the embedding lookup and the answer is exact wherever the embedding rows
are distinct. For k >= 1 the search is greedy, left to right: position t's candidates run as one
batch on top of the recovered prefix's KV cache (transformers' own cache of the shadow part), so a
position costs one batch of single-token forward passes instead of C full prefixes.

A full sweep (every vocabulary token, ``shortlist=None``) is exact search at each step and affordable
on small vocabularies; on a real one (49,152 tokens for SmolLM2) the candidates are shortlisted: the
top ``shortlist`` tokens by cosine between the observed state and the embedding table (the residual
stream keeps the input token's direction for a few blocks), plus any extra candidates per position
(e.g. the learned inverter's top guesses). ``TokenGuesses.in_shortlist`` records whether the true
token was among them, so a caller can report how much the shortlist costs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sftool.privacy.target import AttackTarget, Sentence


@dataclass
class TokenGuesses:
    """An attack's answer for one sentence: best guess and 5 best per position."""

    predicted: np.ndarray  # [T] int64
    top5: np.ndarray  # [T, 5] int64, best first
    #: Whether the true token was a candidate at each position (all True for a full sweep).
    in_shortlist: np.ndarray | None = None


def shortlist_by_embedding(target: AttackTarget, observed: torch.Tensor, size: int) -> torch.Tensor:
    """[T, size] token ids whose embedding rows have the highest cosine with each observed state."""
    table = F.normalize(target.embedding, dim=-1)
    return torch.topk(F.normalize(observed, dim=-1) @ table.T, min(size, table.shape[0]), dim=-1).indices


def _candidate_states(target: AttackTarget, candidates: torch.Tensor, position: int, cache, chunk: int) -> torch.Tensor:
    """Hidden state at ``position`` of each candidate token placed after the cached prefix: [C, H]."""
    states = []
    for start in range(0, len(candidates), chunk):
        part = candidates[start:start + chunk]
        past = None
        if cache is not None:
            # The batch-1 prefix cache, repeated for this chunk; the copy leaves the prefix's own intact.
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(len(part))
        positions = torch.full((len(part), 1), position, dtype=torch.long)
        hidden = target.shadow_forward(part[:, None], position_ids=positions, past=past, use_cache=past is not None)
        states.append((hidden[0] if isinstance(hidden, tuple) else hidden)[:, -1])
    return torch.cat(states)


@torch.no_grad()
def nearest_neighbour_attack(target: AttackTarget, sentence: Sentence, shortlist: int | None = 64,
                             extra_candidates: np.ndarray | None = None, chunk: int = 2048) -> TokenGuesses:
    """Recover ``sentence``'s tokens from its observed states, greedily left to right.

    ``shortlist=None`` tries every vocabulary token at every position; otherwise the top ``shortlist``
    by embedding cosine, united with ``extra_candidates[t]`` where given.
    """
    observed = torch.from_numpy(sentence.observed).float()
    length = observed.shape[0]
    short = None if shortlist is None else shortlist_by_embedding(target, observed, shortlist)
    everything = torch.arange(target.vocab_size)
    predicted = np.zeros(length, dtype=np.int64)
    top5 = np.zeros((length, 5), dtype=np.int64)
    in_list = np.ones(length, dtype=bool)
    cache = None
    for t in range(length):
        if short is None:
            candidates = everything
        else:
            candidates = short[t]
            if extra_candidates is not None:
                candidates = torch.unique(torch.cat([candidates, torch.as_tensor(extra_candidates[t], dtype=torch.long)]))
            in_list[t] = bool((candidates == int(sentence.ids[t])).any())
        states = _candidate_states(target, candidates, t, cache, chunk)
        distance = (states - observed[t]).pow(2).sum(-1)
        order = torch.argsort(distance)[:5]
        best = candidates[order]
        predicted[t] = int(best[0])
        top5[t, : len(best)] = best.numpy()
        top5[t, len(best):] = int(best[0])
        if target.split > 0 and t + 1 < length:
            # Extend the prefix with the guess (right or wrong: the attacker does not know).
            _, cache = target.shadow_forward(best[:1, None], position_ids=torch.tensor([[t]]), past=cache, use_cache=True)
    return TokenGuesses(predicted, top5, in_list if short is not None else None)

"""Several server ranks training one adapter: torch.distributed (gloo on CPU, NCCL on GPU).

Every rank draws its local batch from its own source (its own devices, its own mixing buffer);
one optimizer step trains the **global batch**, the union of the ranks' local batches. That is
exact, not an approximation of it: the task's loss is a mean over counted items (samples, or
labelled tokens), so each rank weights its local mean by ``local count / global count`` and the
summed gradients are the gradient of the global batch's mean. Clipping and AdamW then see the
same gradient on every rank, and the weights stay identical without a broadcast.

Ranks agree before anything blocks:

* :meth:`RankGroup.agree` (every loop turn): does any rank have a batch, have all sources ended,
  has any rank been asked to stop. A rank without a batch joins the step with nothing (count 0,
  zero gradients), so no rank waits forever in an all-reduce another rank never enters.
* the step's count (after the forward, so a batch whose loss is not finite counts 0 and is
  refused on its rank alone) and the gradients (one flat all-reduce: the LoRA + head parameters
  are a few MB, one bucket).

The trainable parameters are all-reduced by hand rather than through ``DistributedDataParallel``:
a rank that has no batch must still take part, which DDP's backward hooks cannot express, and
one flat bucket after the backward is what DDP would do with these few MB anyway (it overlaps
buckets with the backward, which one bucket cannot). The model itself stays unwrapped, so
saving and evaluation reach it directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Agreement:
    """What every rank learns at the top of a loop turn."""

    #: Ranks that hold a batch this turn.
    ranks_with_batch: int
    #: Every rank's source has ended.
    all_ended: bool
    #: Some rank was asked to stop (a signal, a failure): all stop together.
    stop: bool


class RankGroup:
    """This process's place among the server ranks, and the collectives the training core needs."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank = rank
        self.world_size = world_size
        #: Seconds spent in the gradient all-reduce (what ``sftool bench scale`` reports).
        self.allreduce_s = 0.0
        self.allreduces = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder, evaluates and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, backend: str | None = None) -> RankGroup:
        """The group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), joined here; a
        single process without those variables is rank 0 of 1 and joins nothing."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size())

    def _sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def agree(self, has_batch: bool, ended: bool, stop: bool, device: torch.device | None = None) -> Agreement:
        """One small all-reduce: the loop turn's facts of every rank."""
        have, ends, stops = self._sum([float(has_batch), float(ended), float(stop)], device or torch.device("cpu"))
        return Agreement(int(have), int(ends) == self.world_size, stops > 0)

    def global_totals(self, count: int, samples: int, device: torch.device | None = None) -> tuple[int, int]:
        """The global batch's counted items (samples or labelled tokens: what the loss averages
        over) and samples (what the budget counts), from this rank's."""
        total_count, total_samples = self._sum([float(count), float(samples)], device or torch.device("cpu"))
        return int(total_count), int(total_samples)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every trainable parameter's gradient over the ranks, in one flat bucket; a parameter
        without a gradient on this rank (no batch) contributes zeros."""
        if not self.distributed:
            return
        started = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        self.allreduce_s += time.perf_counter() - started
        self.allreduces += 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the group together: a rank that tears its connections down while a peer is still
        in a collective makes gloo abort that peer (SIGABRT)."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


#: The group of a single process: no collectives at all.
SINGLE = RankGroup()

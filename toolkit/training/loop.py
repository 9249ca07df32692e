"""The training loop: the one loop every method and every batch source runs.

    while not stopped:
        batch = source.next_batch()      # a mixed activation batch, a device's token batch, ...
        result = method.step(batch)      # what one step is depends on the method
        ledger.settle(batch.keys)        # exactly once, checkpointed
        logger.step(result)              # rank 0 writes
        method.after_step(result)        # e.g. federated aggregation
        evaluate / checkpoint on schedule; stop at the budget

Nothing in it knows the task, the method or where batches come from. With several server ranks
(``ranks``), every turn starts with one agreement of all ranks (``RankGroup.agree``): a rank
without a batch joins the step empty, and all stop together; steps, budget and the end are global.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from sftool.server.checkpoint import TrainingProgress
from sftool.server.trainer import StepResult
from sftool.training.distributed import SINGLE, RankGroup
from sftool.training.ledger import Ledger
from sftool.training.run_logger import RunLogger
from sftool.training.sources import END


class Source(Protocol):
    def next_batch(self, timeout: float = 0.05) -> Any: ...

    def alive(self) -> bool: ...


class Method(Protocol):
    """A training method as the loop sees it (see ``sftool.training.methods``)."""

    def step(self, batch: Any) -> StepResult: ...

    def idle_step(self) -> StepResult | None: ...

    def after_step(self, result: StepResult) -> None: ...


@dataclass
class Budget:
    """When to stop: after ``max_steps`` steps or ``max_samples`` trained samples (None: no limit)."""

    max_steps: int | None = None
    max_samples: int | None = None

    def reached(self, steps: int, samples: int) -> bool:
        return (self.max_steps is not None and steps >= self.max_steps) or (
            self.max_samples is not None and samples >= self.max_samples
        )


@dataclass
class LoopStats:
    """Where the loop's time went (for the progress line and the summary)."""

    started: float
    train_s: float = 0.0
    device_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    last_step: StepResult | None = None


class TrainingLoop:
    """Draw, step, settle, log, aggregate, evaluate, checkpoint; until the budget, the end of the
    source, or a stop request (``stop_requested``, set from a signal handler or another thread)."""

    def __init__(
        self,
        method: Method,
        source: Source,
        ledger: Ledger,
        logger: RunLogger,
        progress: TrainingProgress,
        budget: Budget,
        eval_every: int = 0,
        checkpoint_every: int = 0,
        evaluate: Callable[[], Any] | None = None,
        checkpoint: Callable[[], Any] | None = None,
        extra_metrics: Callable[[], dict[str, float]] | None = None,
        on_refused: Callable[[Any], None] | None = None,
        ranks: RankGroup = SINGLE,
    ):
        self.method = method
        self.source = source
        self.ledger = ledger
        self.logger = logger
        self.progress = progress
        self.budget = budget
        self.eval_every = eval_every
        self.checkpoint_every = checkpoint_every
        self.evaluate = evaluate
        self.checkpoint = checkpoint
        self.extra_metrics = extra_metrics
        #: Called with a batch whose step was refused (not finite), e.g. to flag its devices.
        self.on_refused = on_refused
        self.ranks = ranks
        self.stats = LoopStats(time.perf_counter())
        self.stop_requested: str | None = None
        #: Samples trained by every rank together (the budget counts these); this rank's alone are
        #: ``progress.samples_trained``.
        self.global_samples = progress.samples_trained
        #: Why this rank's source ended (None: it has not).
        self._ended: str | None = None

    def budget_reached(self) -> bool:
        return self.budget.reached(self.progress.step, self.global_samples)

    def run(self, on_progress: Callable[[], None] | None = None, progress_every_s: float = 2.0) -> str:
        """Train until done; returns why it stopped."""
        last_report = time.perf_counter()
        while True:
            if self.budget_reached():
                return "budget reached"
            stop = self.stop_requested
            if stop is not None and not self.ranks.distributed:
                return stop
            batch = None if (stop is not None or self._ended) else self.source.next_batch()
            if batch is END or (isinstance(batch, str) and not self.source.alive()):
                self._ended = "all devices finished" if batch is END else "receiver stopped"
            ready = batch is not None and batch is not END and not isinstance(batch, str)
            if self.ranks.distributed:
                turn = self.ranks.agree(ready, self._ended is not None, stop is not None)
                if turn.stop:
                    return stop or "stopped by another rank"
                if turn.all_ended:
                    return "all devices finished"
                if ready:
                    self._step(batch)
                elif turn.ranks_with_batch:
                    self._idle_step()
                elif self._ended:
                    time.sleep(0.01)  # waiting for the other ranks' sources to end
            elif self._ended:
                return self._ended
            elif ready:
                self._step(batch)
            if on_progress and time.perf_counter() - last_report >= progress_every_s:
                on_progress()
                last_report = time.perf_counter()

    def _idle_step(self) -> None:
        """Another rank trains this turn: join its global step with nothing of our own."""
        result = self.method.idle_step()
        if result is not None:
            self._count_global(result)

    def _count_global(self, result: StepResult) -> None:
        self.progress.step = result.step
        self.global_samples += result.global_size or result.size

    def _step(self, batch: Any) -> None:
        result = self.method.step(batch)
        if result.refused:
            # Settled, so the run can end, but never trained (with several ranks, the others' part
            # of the global step may still have changed the weights: the step count follows it).
            if result.global_size:
                self._count_global(result)
            self.ledger.settle(batch.keys)
            self.progress.samples_refused += result.size
            for key in batch.keys:
                self.progress.refused_by_device[key.device] = self.progress.refused_by_device.get(key.device, 0) + 1
            self.logger.refused(result, batch.keys)
            if self.on_refused is not None:
                self.on_refused(batch)
            return
        self._count_global(result)
        self.progress.samples_trained += result.size
        self.stats.train_s += result.seconds
        self.stats.device_s += result.device_s
        self.stats.bytes_up += result.bytes_up
        self.stats.bytes_down += result.bytes_down
        self.stats.last_step = result
        self.ledger.settle(batch.keys)
        extra = {"samples": float(self.progress.samples_trained), **(self.extra_metrics() if self.extra_metrics else {})}
        self.logger.step(result, batch.keys, extra)
        self.method.after_step(result)
        if self.eval_every and self.evaluate is not None and result.step % self.eval_every == 0:
            self.evaluate()
        if self.checkpoint_every and self.checkpoint is not None and result.step % self.checkpoint_every == 0:
            self.checkpoint()

"""What every method shares: the name it is known by, and the no-op hooks."""

from __future__ import annotations

from pathlib import Path

from sftool.errors import SftoolError
from sftool.server.trainer import StepResult


class MethodBase:
    """A training method: ``step`` turns one batch into an update; ``after_step`` aggregates where
    the method has device-side state to aggregate; ``save_adapter`` writes what it trained in peft
    format, loadable on the unsplit model."""

    name = "method"

    def step(self, batch) -> StepResult:
        raise NotImplementedError

    def idle_step(self) -> StepResult | None:
        """Join another server rank's global step with no batch of this rank's. Only methods whose
        step is one server update (SplitFrozen, centralized) run on several ranks."""
        raise SftoolError(f"{self.name} does not train on several server ranks")

    def after_step(self, result: StepResult) -> None:
        """Called after every step (and its ledger record); nothing by default."""

    def finish(self) -> None:
        """Called once when the loop ends (a federated method averages a last, partial round)."""

    def save_adapter(self, folder: Path) -> None:
        raise NotImplementedError

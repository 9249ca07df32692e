"""The settings every method shares: LoRA and the optimizer. Torch-free, so the command line and
the run configuration read their defaults from here (one list of defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass
class LoraSettings:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    #: None: the family's default target modules.
    targets: Sequence[str] | None = None

    def peft_config(self, adapter, layers: Sequence[int] | None = None, task_type=None):
        """The peft LoraConfig for a model of ``adapter``'s family (LoRA on ``layers``, default all)."""
        from peft import LoraConfig

        return LoraConfig(
            task_type=task_type,
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.targets or adapter.default_lora_targets),
            layers_to_transform=None if layers is None else list(layers),
            fan_in_fan_out=adapter.lora_fan_in_fan_out,
        )


@dataclass
class OptimSettings:
    """AdamW with linear warm-up and gradient-norm clipping; the defaults are the recipe ``sftool demo`` uses."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 4
    max_grad_norm: float = 1.0



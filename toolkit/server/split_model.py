"""The server's half of the model: blocks k..L-1 with LoRA, the final norm and a classification head.

It wraps a regular transformers ``*ForSequenceClassification`` model in peft, so the adapter it
saves loads with plain ``peft.PeftModel.from_pretrained`` on the unsplit model. It never calls
the model's own forward: received activations enter at block k through the family adapter.

Decomposed backward: activations arrive as leaf tensors without ``requires_grad`` and every
pretrained weight is frozen, so autograd records only what the LoRA factors and the head need;
the frozen catch-up blocks of devices with an earlier split run under ``no_grad`` entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from sftool.errors import SftoolError
from sftool.exporters.families import adapter_for
from sftool.exporters.model_source import load_model
from sftool.exporters.partition import BlockRunner, DevicePart, check_split, weights_fingerprint
from torch import nn


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
class SplitModelSpec:
    source: str
    num_labels: int
    #: Every split the server accepts; LoRA goes on blocks max(splits)..L-1.
    splits: Sequence[int]
    pad_token_id: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (what a causal LM's classification head pools)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


class SplitServerModel(nn.Module):
    """Blocks k_max..L-1 (+LoRA) -> norm -> pooled head, plus frozen catch-up blocks for smaller splits."""

    def __init__(self, spec: SplitModelSpec):
        super().__init__()
        from peft import TaskType, get_peft_model

        base = load_model(spec.source, head="seq_cls", num_labels=spec.num_labels, pad_token_id=spec.pad_token_id)
        self.adapter = adapter_for(base.config.model_type)
        backbone = self.adapter.backbone(base)
        self.num_layers = self.adapter.num_layers(base.config)
        self.hidden_size = self.adapter.hidden_size(base.config)
        for split in spec.splits:
            check_split(split, self.num_layers)
        self.splits = sorted(set(spec.splits))
        self.train_from = max(self.splits)
        # Fingerprints of the device layers as this server has them, before peft touches anything.
        self.fingerprints = {k: weights_fingerprint(DevicePart(self.adapter, backbone, k)) for k in self.splits}

        config = spec.lora.peft_config(self.adapter, range(self.train_from, self.num_layers), TaskType.SEQ_CLS)
        try:
            self.peft_model = get_peft_model(base, config)
        except ValueError as exc:
            raise SftoolError(f"cannot apply LoRA to {sorted(config.target_modules)}: {exc}") from None
        hf_model = self.peft_model.base_model.model
        self.runner = BlockRunner(self.adapter, self.adapter.backbone(hf_model))
        # peft wraps the head in ModulesToSaveWrapper (trainable copy, saved with the adapter).
        self.head = hf_model.score
        self.config = base.config

    def train(self, mode: bool = True) -> SplitServerModel:
        """Blocks before k_max belong to the device side: they run as the device runs them (eval
        mode, no dropout) even while the server blocks train."""
        super().train(mode)
        for block in list(self.runner.blocks)[: self.train_from]:
            block.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @torch.no_grad()
    def catch_up(self, hidden: torch.Tensor, attention_mask: torch.Tensor, split: int) -> torch.Tensor:
        """Run the frozen blocks split..k_max-1 for a device that split earlier (no autograd at all)."""
        if split == self.train_from:
            return hidden
        if split not in self.splits:
            raise SftoolError(f"split {split} is not accepted by this server")
        return self.runner(hidden, attention_mask, split, self.train_from, norm=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] from activations at block k_max."""
        out = self.runner(hidden, attention_mask, self.train_from)
        pooled = out[torch.arange(out.shape[0], device=out.device), last_token_index(attention_mask)]
        return self.head(pooled)

    def save_adapter(self, folder) -> None:
        """peft format: LoRA weights plus the head (``modules_to_save``), loadable on the unsplit model."""
        self.peft_model.save_pretrained(str(folder))

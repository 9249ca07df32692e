"""The model every method trains: a transformers model in peft, run block by block from any cut.

SplitFrozen trains blocks k..L-1 with LoRA, the final norm and the task's head; activations enter
at block k through the family adapter (the model's own forward is never called). SplitLoRA,
FedLoRA and centralized LoRA use the same class with LoRA on other blocks (``lora_layers``) and
run the device blocks too (``device_forward``). The head comes from the task (a
``*ForSequenceClassification`` head for classification), so the adapter it saves loads with plain
``peft.PeftModel.from_pretrained`` on the unsplit model.

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
from sftool.server.accelerator import autocast
from sftool.settings import LoraSettings
from sftool.training.task import ClassificationTask, Task, last_token_index
from torch import nn

__all__ = ["LoraSettings", "SplitModelSpec", "SplitServerModel", "last_token_index"]


@dataclass
class SplitModelSpec:
    source: str
    #: The task (its head, loss and labels); an int is read as a classification task of that many labels.
    task: Task | int
    #: Every split the server accepts; by default LoRA goes on blocks max(splits)..L-1.
    splits: Sequence[int]
    pad_token_id: int | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    #: Blocks that get LoRA; None: the server's blocks max(splits)..L-1 (SplitFrozen).
    lora_layers: Sequence[int] | None = None
    #: Recompute each block's activations in the backward instead of keeping them (``BlockRunner.recompute``).
    recompute: bool = False
    #: "fp32", or "bf16": the forward under autocast (``sftool.server.accelerator``), weights kept fp32.
    precision: str = "fp32"

    @property
    def resolved_task(self) -> Task:
        return ClassificationTask(self.task) if isinstance(self.task, int) else self.task


class SplitServerModel(nn.Module):
    """Blocks k_max..L-1 (+LoRA) -> norm -> the task's head, plus frozen catch-up blocks for smaller
    splits; with ``lora_layers`` covering device blocks, also the trainable device side."""

    def __init__(self, spec: SplitModelSpec):
        super().__init__()
        from peft import get_peft_model

        self.task = spec.resolved_task
        base = load_model(spec.source, pad_token_id=spec.pad_token_id, **self.task.model_kwargs())
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

        layers = range(self.train_from, self.num_layers) if spec.lora_layers is None else spec.lora_layers
        self.lora_layers = sorted(set(layers))
        config = spec.lora.peft_config(self.adapter, self.lora_layers, self.task.peft_task_type())
        try:
            self.peft_model = get_peft_model(base, config)
        except ValueError as exc:
            raise SftoolError(f"cannot apply LoRA to {sorted(config.target_modules)}: {exc}") from None
        hf_model = self.peft_model.base_model.model
        self.runner = BlockRunner(self.adapter, self.adapter.backbone(hf_model))
        self.runner.recompute = spec.recompute
        self.precision = spec.precision
        # peft wraps the head in ModulesToSaveWrapper (trainable copy, saved with the adapter).
        self.head = self.task.head_module(hf_model)
        self.config = base.config

    def train(self, mode: bool = True) -> SplitServerModel:
        """Frozen blocks before k_max belong to the device side: they run as the device runs them
        (eval mode, no dropout) even while the server blocks train."""
        super().train(mode)
        for i, block in enumerate(list(self.runner.blocks)[: self.train_from]):
            if i not in self.lora_layers:
                block.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: batches are moved there."""
        return next(self.parameters()).device

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

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """The task's logits from activations at block ``start`` (default k_max), in float32 whatever
        the precision of the blocks, so every loss and metric is computed alike."""
        with autocast(hidden.device, self.precision):
            out = self.runner(hidden, attention_mask, self.train_from if start is None else start)
            logits = self.task.logits(out, attention_mask, self.head)
        return logits.float()

    @torch.no_grad()
    def decode(self, hidden: torch.Tensor, attention_mask: torch.Tensor, cache, last_only: bool = True) -> torch.Tensor:
        """Next-token logits from the activations [B, q, H] of q new positions at block k_max, whose
        earlier positions' keys and values ``cache`` (``sftool.exporters.kv_cache.KeyValueCache``) holds for
        the server's blocks and which this call extends; ``attention_mask`` [B, P+q] covers both (the
        position offset is P). ``last_only``: the last position's logits [B, 1, V] alone."""
        out = self.runner.decode(hidden, attention_mask, cache, self.train_from)
        if last_only:
            out = out[:, -1:]
        new_mask = attention_mask[:, attention_mask.shape[1] - out.shape[1] :]
        return self.task.logits(out, new_mask, self.head)

    def device_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int) -> torch.Tensor:
        """Embeddings + blocks 0..split-1 as this model has them (with their LoRA, if any): the
        trainable device side of SplitLoRA and FedLoRA; gradients flow when LoRA is on them."""
        from sftool.exporters.families.base import position_ids_from_mask

        position_ids = position_ids_from_mask(attention_mask)
        with autocast(input_ids.device, self.precision):
            hidden = self.adapter.embed(self.runner.embeddings, input_ids, position_ids)
            return self.runner(hidden, attention_mask, 0, split, norm=False)

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The unsplit model: tokens to the task's logits."""
        return self.forward(self.device_forward(input_ids, attention_mask, 0), attention_mask, 0)

    def save_adapter(self, folder) -> None:
        """peft format: LoRA weights plus the head (``modules_to_save``), loadable on the unsplit model."""
        self.peft_model.save_pretrained(str(folder))

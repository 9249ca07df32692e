"""Evaluate the full split model on held-out data: the device part exactly as devices run it
(the exported ONNX, fp32 or int8), then the server part with its current LoRA and head."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sftool.runtime.local_data import Example, TextEncoder, bucketed_batches, encode_examples, example_lengths
from sftool.runtime.manifest import Manifest
from sftool.runtime.onnx_model import DeviceModel, choose_variant
from sftool.server.split_model import SplitServerModel
from sftool.training.task import Score


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    seconds: float

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "loss": self.loss, "n": self.n, "seconds": self.seconds}


class Evaluator:
    """Accuracy and mean loss of ``model`` on ``examples``, through the device artifacts of its split."""

    def __init__(
        self,
        model: SplitServerModel,
        artifacts: Path,
        manifest: Manifest,
        examples: Sequence[Example],
        precision: str = "fp32",
        batch_size: int = 32,
        threads: int | None = None,
    ):
        if manifest.split != model.train_from:
            raise ValueError("evaluation runs the device part of the split the server trains from")
        self.model = model
        self.examples = list(examples)
        self.device = DeviceModel(artifacts, manifest, choose_variant(manifest, precision), threads=threads)
        self.encoder = TextEncoder(Path(artifacts) / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
        self.token_labels = bool(model.task.label_spec.dims)
        self.eos_token_id = manifest.eos_token_id
        lengths = example_lengths(self.encoder, self.examples, self.token_labels)
        self.batches = bucketed_batches(lengths, batch_size, window=len(lengths))
        self._hidden_cache: list[tuple[torch.Tensor, torch.Tensor, np.ndarray]] | None = None

    def _device_outputs(self) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        # The device layers are frozen: their outputs never change, so compute them once.
        if self._hidden_cache is None:
            self._hidden_cache = []
            for idx in self.batches:
                rows = [self.examples[i] for i in idx]
                ids, mask, labels = encode_examples(self.encoder, rows, self.token_labels, self.eos_token_id)
                hidden = self.device.forward(ids, mask)
                self._hidden_cache.append((torch.from_numpy(np.ascontiguousarray(hidden)), torch.from_numpy(mask), labels))
        return self._hidden_cache

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        score = Score()
        task = self.model.task
        for hidden, mask, labels in self._device_outputs():
            at = self.model.device
            labels = task.labels_tensor(list(labels)).to(at)
            score.add(task.score(self.model(hidden.to(at), mask.to(at)), labels))
        self.model.train(was_training)
        return EvalResult(score.accuracy, score.loss, score.count, time.perf_counter() - started)

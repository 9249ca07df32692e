"""Next-token models: one prompt in, the last position's logits out, then one token at a time.

- ``SplitDecoder``: the device decoder on onnxruntime (its own key/value cache, ``DecoderSession``) feeding
  the server's blocks in torch (their cache, ``SplitServerModel.decode``) and the model's LM head; both
  halves in this process, each timed.
- ``RecomputeSplitDecoder``: the same two halves without a cache (every step runs the whole prefix
  through ``device.onnx`` and the server blocks): what the cache saves, for ``sftool bench decode``.
- ``UnsplitDecoder``: the plain transformers model (peft adapter attached, or none) with its own cache:
  the reference the split must equal.

Batch size one: a sequence per decoder. Every path hands its logits over as float32 numpy, so one
``Sampler`` chooses for all of them.
"""

from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np
import torch
from sftool.exporters.kv_cache import KeyValueCache


class NextTokenModel(Protocol):
    """What the generation loop drives."""

    #: Seconds spent per half since the last ``prefill`` (``device``, ``server`` or ``model``), steps only.
    step_seconds: dict[str, float]

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """Forget any earlier sequence, run the prompt; logits [V] of its last position."""

    def step(self, token: int) -> np.ndarray:
        """Append ``token``; logits [V] of the next position."""


def _last_logits(logits: torch.Tensor) -> np.ndarray:
    return logits[0, -1].float().cpu().numpy()


class SplitDecoder:
    """The device decoder (onnxruntime) + the server blocks and LM head (torch), each with its cache."""

    def __init__(self, device, server):
        """``device``: a ``sftool.runtime.decoder_session.DecoderSession``; ``server``: a ``SplitServerModel``
        with a causal-LM task, in eval mode."""
        self.device = device
        self.server = server
        self.step_seconds = {"device": 0.0, "server": 0.0}
        self._cache = KeyValueCache()
        self._mask = torch.zeros(1, 0, dtype=torch.long)

    def _run(self, ids: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        hidden = self.device.run(ids, np.ones_like(ids))
        device_done = time.perf_counter()
        target = self.server.device
        self._mask = torch.cat([self._mask, torch.ones(ids.shape, dtype=torch.long)], dim=1)
        logits = self.server.decode(torch.from_numpy(hidden).to(target), self._mask.to(target), self._cache)
        out = _last_logits(logits)
        self._seconds = (device_done - started, time.perf_counter() - device_done)
        return out

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self.device.reset()
        self._cache = KeyValueCache()
        self._mask = torch.zeros(1, 0, dtype=torch.long)
        self.step_seconds = {"device": 0.0, "server": 0.0}
        return self._run(np.asarray([list(prompt_ids)], dtype=np.int64))

    def step(self, token: int) -> np.ndarray:
        out = self._run(np.asarray([[int(token)]], dtype=np.int64))
        self.step_seconds["device"] += self._seconds[0]
        self.step_seconds["server"] += self._seconds[1]
        return out


class RecomputeSplitDecoder:
    """Both halves without a cache: each step runs the whole sequence so far through the device part
    (``DeviceModel``, ``device.onnx``) and the server blocks, the LM head on the last position alone."""

    def __init__(self, device, server):
        """``device``: a ``sftool.runtime.onnx_model.DeviceModel``; ``server``: a ``SplitServerModel``."""
        self.device = device
        self.server = server
        self.step_seconds = {"device": 0.0, "server": 0.0}
        #: (device, server) seconds of the latest call.
        self.last_seconds = (0.0, 0.0)
        self._ids: list[int] = []

    def _run(self) -> tuple[np.ndarray, float, float]:
        ids = np.asarray([self._ids], dtype=np.int64)
        mask = np.ones_like(ids)
        started = time.perf_counter()
        hidden = self.device.forward(ids, mask)
        device_done = time.perf_counter()
        target = self.server.device
        with torch.no_grad():
            mask_t = torch.from_numpy(mask).to(target)
            out = self.server.runner(torch.from_numpy(hidden).to(target), mask_t, self.server.train_from)[:, -1:]
            logits = self.server.task.logits(out, mask_t[:, -1:], self.server.head)
        result = _last_logits(logits)
        self.last_seconds = (device_done - started, time.perf_counter() - device_done)
        return result, *self.last_seconds

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        self._ids = [int(t) for t in prompt_ids]
        self.step_seconds = {"device": 0.0, "server": 0.0}
        return self._run()[0]

    def step(self, token: int) -> np.ndarray:
        self._ids.append(int(token))
        out, device_s, server_s = self._run()
        self.step_seconds["device"] += device_s
        self.step_seconds["server"] += server_s
        return out


class UnsplitDecoder:
    """A transformers causal LM (a peft model with the adapter attached, or the plain model) with its cache."""

    def __init__(self, model):
        self.model = model
        self.step_seconds = {"model": 0.0}
        self._cache = None
        self._mask = torch.zeros(1, 0, dtype=torch.long)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, ids: torch.Tensor) -> np.ndarray:
        self._mask = torch.cat([self._mask, torch.ones(ids.shape, dtype=torch.long)], dim=1)
        out = self.model(input_ids=ids.to(self._device), attention_mask=self._mask.to(self._device),
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.past_key_values
        return _last_logits(out.logits)

    def prefill(self, prompt_ids: Sequence[int]) -> np.ndarray:
        from transformers import DynamicCache

        self._cache = DynamicCache()
        self._mask = torch.zeros(1, 0, dtype=torch.long)
        self.step_seconds = {"model": 0.0}
        return self._run(torch.tensor([list(prompt_ids)], dtype=torch.long))

    def step(self, token: int) -> np.ndarray:
        started = time.perf_counter()
        out = self._run(torch.tensor([[int(token)]], dtype=torch.long))
        self.step_seconds["model"] += time.perf_counter() - started
        return out

"""The device decoder on onnxruntime: the device part run token by token, its key/value cache kept here.

Torch-free. One session holds the cache of one batch of sequences: ``run`` the prompt (all its tokens in
one call), then each new token; every call returns the hidden states of the new positions, which are what
the device part's full forward gives at those positions of the whole sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sftool.errors import SftoolError
from sftool.runtime.manifest import DecoderFile, Manifest
from sftool.runtime.onnx_model import SessionSettings, open_session

HIDDEN_OUTPUT = "hidden_states"


class DecoderSession:
    """``device.decode.onnx`` with its cache: past keys/values and the attention mask seen so far."""

    def __init__(self, session, decoder: DecoderFile):
        self.session = session
        self.decoder = decoder
        self._outputs = [HIDDEN_OUTPUT, *decoder.present_outputs]
        self.reset()

    @classmethod
    def from_file(cls, path: Path, decoder: DecoderFile, settings: SessionSettings | None = None) -> DecoderSession:
        try:
            session = open_session(Path(path), settings)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise SftoolError(f"onnxruntime cannot load {path}: {exc}") from None
        return cls(session, decoder)

    @classmethod
    def open(cls, folder: Path, manifest: Manifest, settings: SessionSettings | None = None) -> DecoderSession:
        """The decoder of an artifacts folder (SftoolError where the export has none)."""
        decoder = manifest.require_decoder()
        return cls.from_file(Path(folder) / decoder.file, decoder, settings)

    def reset(self) -> None:
        """Forget every cached position: the next ``run`` starts new sequences."""
        self._past: list[np.ndarray] | None = None
        self._mask: np.ndarray | None = None

    @property
    def length(self) -> int:
        """Positions cached (padding included)."""
        return 0 if self._mask is None else int(self._mask.shape[1])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Hidden states [B, q, H] (float32) of ``input_ids`` [B, q] after the cached positions;
        ``attention_mask`` [B, q] marks which new positions are real tokens. The cache grows by q."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        new_mask = np.asarray(attention_mask, dtype=np.int64)
        if input_ids.ndim != 2 or new_mask.shape != input_ids.shape or input_ids.shape[1] == 0:
            raise SftoolError(f"decoder input must be [batch, tokens] ids with a mask of that shape, not {input_ids.shape}")
        batch = input_ids.shape[0]
        if self._past is None:
            d = self.decoder
            self._past = [np.zeros((batch, d.kv_heads, 0, d.head_dim), dtype=np.float32) for _ in d.past_inputs]
            self._mask = np.zeros((batch, 0), dtype=np.int64)
        elif batch != self._mask.shape[0]:
            raise SftoolError(f"this decoder's cache holds {self._mask.shape[0]} sequences, not {batch}; reset it first")
        mask = np.concatenate([self._mask, new_mask], axis=1)
        feeds = {"input_ids": input_ids, "attention_mask": mask, **dict(zip(self.decoder.past_inputs, self._past))}
        hidden, *presents = self.session.run(self._outputs, feeds)
        self._past, self._mask = presents, mask
        return hidden

"""What an honest-but-curious server attacks: one split, its observed activations, and its own copy
of the device part (the same public weights the server already holds for training).

``AttackTarget.from_export`` reads an ``sftool export`` folder: the activations it observes are the
ONNX device part's output with the device's defense and wire cast applied (``device_activations``,
the function a real device runs), and the shadow part is the model's first k blocks in torch,
checked against the manifest's weights fingerprint. ``AttackTarget.from_model`` builds the same for
a model source at any k >= 0 without an export (k = 0, the embedding alone, cannot be exported).

The shadow part is the transformers backbone cut to k blocks with the final norm replaced by the
identity, so its output is the device part's (a test checks it against the ONNX file) and it keeps
transformers' own KV cache, which the greedy nearest-neighbour search uses for its prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sftool.errors import SftoolError
from sftool.runtime.activation_noise import NoiseDefense
from torch import nn


def _replace_child(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` is among ``parent``'s direct children (families name them differently)."""
    for name, child in parent.named_children():
        if child is old:
            setattr(parent, name, new)
            return
    raise SftoolError(f"cannot find {type(old).__name__} in {type(parent).__name__}")


def shadow_backbone(model: nn.Module, adapter, split: int) -> nn.Module:
    """The model's backbone cut to blocks 0..split-1, with no final norm: inputs -> hidden after block k-1."""
    backbone = adapter.backbone(model)
    layers = adapter.layers(backbone)
    _replace_child(backbone, layers, nn.ModuleList(list(layers)[:split]))
    _replace_child(backbone, adapter.final_norm(backbone), nn.Identity())
    config = backbone.config
    config.num_hidden_layers = split
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types)[:split]
    return backbone.eval()


@dataclass
class Sentence:
    """One audited text: its token ids and what the server observed for it ([T, H] float32)."""

    text: str
    ids: np.ndarray
    observed: np.ndarray


class AttackTarget:
    """One split under attack. ``observe`` gives the server's view of a text; ``shadow`` is the torch
    device part the attacker runs; ``embedding`` is the token embedding table as the blocks see it."""

    def __init__(self, name: str, split: int, shadow: nn.Module, embedding: torch.Tensor, encoder,
                 decode, onnx_model=None, defense: NoiseDefense | None = None, wire_dtype: str = "fp16"):
        self.name = name
        self.split = split
        self.shadow = shadow
        self.embedding = embedding
        self.encoder = encoder
        self.decode = decode
        self.onnx_model = onnx_model
        self.defense = defense or NoiseDefense()
        self.wire_dtype = wire_dtype
        self.rng = self.defense.generator()

    @property
    def vocab_size(self) -> int:
        return int(self.embedding.shape[0])

    @classmethod
    def from_export(cls, folder: Path, defense: NoiseDefense | None = None, wire_dtype: str = "fp16",
                    threads: int | None = None) -> AttackTarget:
        """The split exported in ``folder``; the server's copy of the weights comes from the manifest's source."""
        from sftool.exporters.families import adapter_for
        from sftool.exporters.model_source import load_model
        from sftool.exporters.partition import DevicePart, weights_fingerprint
        from sftool.runtime.local_data import TextEncoder
        from sftool.runtime.manifest import load_manifest
        from sftool.runtime.onnx_model import DeviceModel, SessionSettings, choose_variant

        folder = Path(folder)
        manifest = load_manifest(folder)
        model = load_model(manifest.source)
        adapter = adapter_for(model.config.model_type)
        fingerprint = weights_fingerprint(DevicePart(adapter, adapter.backbone(model), manifest.split))
        if fingerprint != manifest.weights_fingerprint:
            raise SftoolError(f"{folder}: the weights of {manifest.source} are not the ones this split was exported from")
        onnx_model = DeviceModel(folder, manifest, choose_variant(manifest, "fp32"), settings=SessionSettings(threads))
        encoder = TextEncoder(folder / manifest.tokenizer_file, manifest.max_seq_len, manifest.pad_token_id)
        return cls._build(f"split-{manifest.split}", model, adapter, manifest.split, encoder, folder / manifest.tokenizer_file,
                          onnx_model, defense, wire_dtype)

    @classmethod
    def from_model(cls, source: str, split: int, max_len: int = 512, defense: NoiseDefense | None = None,
                   wire_dtype: str = "fp16") -> AttackTarget:
        """A model source at any ``split`` >= 0; the observation is the torch part's own output."""
        from sftool.exporters.families import adapter_for
        from sftool.exporters.model_source import load_model, resolve_source
        from sftool.runtime.local_data import TextEncoder

        model = load_model(source)
        adapter = adapter_for(model.config.model_type)
        if not 0 <= split < adapter.num_layers(model.config):
            raise SftoolError(f"split {split} is out of range for {source}")
        location, _ = resolve_source(source)
        tokenizer = Path(location) / "tokenizer.json"
        if not tokenizer.is_file():
            raise SftoolError(f"{source} has no tokenizer.json")
        encoder = TextEncoder(tokenizer, max_len, model.config.pad_token_id or 0)
        return cls._build(f"k={split}", model, adapter, split, encoder, tokenizer, None, defense, wire_dtype)

    @classmethod
    def _build(cls, name, model, adapter, split, encoder, tokenizer_file, onnx_model, defense, wire_dtype) -> AttackTarget:
        from tokenizers import Tokenizer

        backbone = adapter.backbone(model)
        embed = backbone.get_input_embeddings()
        with torch.no_grad():
            table = embed.weight.detach().clone()
            # Gemma scales its lookup by sqrt(hidden): the blocks see the scaled rows.
            table = table * getattr(embed, "embed_scale", 1.0)
        shadow = shadow_backbone(model, adapter, split)
        for p in shadow.parameters():
            p.requires_grad_(False)
        tok = Tokenizer.from_file(str(tokenizer_file))

        def decode(ids: Sequence[int]) -> str:
            return tok.decode([int(i) for i in ids], skip_special_tokens=False)

        return cls(name, split, shadow, table, encoder, decode, onnx_model, defense, wire_dtype)

    # -- what the server sees -----------------------------------------------------------------

    def clean_hidden(self, ids: np.ndarray) -> np.ndarray:
        """The device part's output for one unpadded row of ids: [T, H] float32 (ONNX where exported)."""
        ids2 = ids.reshape(1, -1).astype(np.int64)
        mask = np.ones_like(ids2)
        if self.onnx_model is not None:
            return self.onnx_model.forward(ids2, mask)[0]
        with torch.no_grad():
            return self.shadow_forward(torch.from_numpy(ids2))[0].numpy()

    def observe(self, texts: Sequence[str]) -> list[Sentence]:
        """Each text as the server receives it: tokenized, run, noised by the defense, cast for the wire."""
        from sftool.runtime.device_app import device_activations

        out = []
        for text in texts:
            ids = np.array(self.encoder.token_ids([text])[0], dtype=np.int64)
            if ids.size == 0:
                continue
            hidden = self.clean_hidden(ids)[None]
            sent = device_activations(hidden, np.ones((1, ids.size), dtype=np.int64), self.wire_dtype, self.defense, self.rng)
            out.append(Sentence(text, ids, sent[0].astype(np.float32)))
        return out

    # -- the attacker's own forward passes ------------------------------------------------------

    def shadow_forward(self, ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, past=None, use_cache: bool = False):
        """The shadow part's hidden states [B, T, H] (and the cache when ``use_cache``) for unpadded rows."""
        rows, length = (ids if ids is not None else inputs_embeds).shape[:2]
        seen = length + (past.get_seq_length() if past is not None else 0)
        out = self.shadow(input_ids=ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                          attention_mask=torch.ones(rows, seen, dtype=torch.long), past_key_values=past, use_cache=use_cache)
        return (out.last_hidden_state, out.past_key_values) if use_cache else out.last_hidden_state

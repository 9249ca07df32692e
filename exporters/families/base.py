"""What a model family must provide for sftool to split it.

The split is taken *after* the embedding stage: the device runs ``embed`` and blocks 0..k-1,
the server calls blocks k..L-1 directly with the same context (additive mask, position ids,
rotary embeddings). Activations are never fed back as ``inputs_embeds``: GPT-2 would add its
position embeddings twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Causal + key-padding mask [B,1,T,T]: 0 where attending is allowed, the dtype's min elsewhere.

    Both sides build it from the 2D mask with this one function, which is what makes the split
    forward bit-identical to the unsplit one.
    """
    t = attention_mask.shape[-1]
    idx = torch.arange(t, device=attention_mask.device)
    causal = idx[None, :] <= idx[:, None]  # [T,T] query row may see keys up to itself
    allowed = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def cached_attention_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The mask [B,1,q,P+q] of ``query_len`` new positions that follow P cached ones.

    ``attention_mask`` [B, P+q] covers the cached positions and the new ones; new position i (absolute
    P + i) may see key j iff j <= P + i and j is a real token. With P = 0 it is ``additive_attention_mask``.
    """
    total = attention_mask.shape[-1]
    keys = torch.arange(total, device=attention_mask.device)
    # An arange of known length, not a slice of ``keys``: torch.export cannot size a slice from symbolic bounds.
    queries = torch.arange(total - query_len, total, device=attention_mask.device)
    causal = keys[None, :] <= queries[:, None]  # [q, P+q]
    allowed = causal[None, None, :, :] & attention_mask.bool()[:, None, None, :]
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


class FamilyAdapter(ABC):
    """Knows where a family keeps its embeddings, blocks and final norm, and how to call a block."""

    #: Name written into manifests.
    name: str
    #: transformers ``config.model_type`` values this adapter handles.
    model_types: tuple[str, ...]
    #: peft ``target_modules`` used when the user names none.
    default_lora_targets: tuple[str, ...]
    #: True where the projections store weights as (in, out), like GPT-2's Conv1D.
    lora_fan_in_fan_out: bool = False
    #: Projections that get per-token activation scales in the int8 export (a module matches when its name
    #: within the block ends with an entry): the MLP output projection, whose input (after the MLP's
    #: nonlinearity) carries the massive-activation tokens; rows coming out of a norm, or out of
    #: attention over them, are on one scale already.
    per_token_projections: tuple[str, ...] = ()

    def backbone(self, model: nn.Module) -> nn.Module:
        """The bare transformer (GPT2Model, LlamaModel) inside any wrapper: CausalLM, SeqCls, peft."""
        if hasattr(model, "get_base_model"):  # peft wrapper
            model = model.get_base_model()
        inner = getattr(model, "base_model", model)
        return inner if inner is not None else model

    @abstractmethod
    def layers(self, backbone: nn.Module) -> nn.ModuleList: ...

    @abstractmethod
    def final_norm(self, backbone: nn.Module) -> nn.Module: ...

    @abstractmethod
    def embedding_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        """The modules ``embed`` and ``context`` use (and only those: they go into the ONNX file)."""

    @abstractmethod
    def embed(self, modules: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...

    def context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Keyword arguments every block call needs (mask, and for rotary families cos/sin)."""
        return {"attention_mask": additive_attention_mask(attention_mask, hidden.dtype)}

    def cached_context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> dict[str, Any]:
        """Keyword arguments of a block call on new positions whose earlier keys and values are in
        ``cache`` (``sftool.exporters.kv_cache.KeyValueCache``, which the blocks extend). ``hidden`` holds
        the new positions [B, q, H]; ``attention_mask`` [B, P+q] the cached ones and the new ones, which
        gives the position offset P. Families without it raise SftoolError."""
        from sftool.errors import SftoolError

        raise SftoolError(f"decoding with a key/value cache is not supported yet for the {self.name} family")

    def cached_position_ids(self, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        """Position ids [B, q] of the last ``query_len`` positions of ``attention_mask`` [B, P+q]: the same
        ids the full sequence gives them (``position_ids_from_mask``)."""
        return position_ids_from_mask(attention_mask).narrow(-1, attention_mask.shape[-1] - query_len, query_len)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        out = layer(hidden, **context)
        # Some blocks return a tuple (hidden, attn...), others the tensor alone, depending on version.
        return out[0] if isinstance(out, tuple) else out

    def smoothing_pairs(self, block: nn.Module) -> list[tuple[Callable[[torch.Tensor], None], list[nn.Module]]]:
        """Where int8 smoothing may move activation outliers into weights, exactly: pairs of (divide the
        producer's output channels by s, the projections that read them). None by default."""
        return []

    def fused_layers(self, layers: nn.ModuleList, modules: nn.ModuleDict, max_seq_len: int) -> list[nn.Module] | None:
        """Export-only stand-ins for ``layers`` built on onnxruntime's fused kernels, or None where the
        family has none. Each is called as ``layer(tokens, layout)``: the real tokens [T, H] of a
        right-padded batch of up to ``max_seq_len`` tokens and their ``TokenLayout``; it returns the same
        rows as the transformers layer would at those positions."""
        return None

    def num_layers(self, config: Any) -> int:
        return int(config.num_hidden_layers)

    def hidden_size(self, config: Any) -> int:
        return int(config.hidden_size)

    def max_positions(self, config: Any) -> int:
        return int(getattr(config, "max_position_embeddings", 2048))

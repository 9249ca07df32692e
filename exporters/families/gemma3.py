"""Gemma 3 text models (``Gemma3ForCausalLM``, model_type "gemma3_text"): interleaved sliding-window and
global attention, each with its own rotary base, and RMS norms that scale by ``1 + weight``.

What differs from Llama, and where it is handled:

- the embedding is scaled by sqrt(hidden size): ``Gemma3TextScaledWordEmbedding`` does it, so ``embed``
  calls it as the model does (a plain lookup would be off by a factor of 16-50);
- each block is either ``sliding_attention`` (keys at most ``sliding_window - 1`` tokens back, rotary
  base ``rope_local_base_freq``) or ``full_attention`` (the causal mask, base ``rope_theta``):
  ``context`` builds both masks and both cos/sin pairs once, ``run_layer`` hands a block its mask (the
  block picks its rotary pair itself, from ``attention_type``);
- norms around attention and the MLP and on queries and keys live inside the transformers block, which
  both sides run unchanged; only int8 smoothing touches a norm, and it divides ``1 + weight``;
- ``Gemma3ForCausalLM`` keeps its backbone in ``.model`` under a ``base_model_prefix`` it does not
  have, so ``backbone`` looks there.

There are no fused export layers: the onnxruntime file is the plain graph with onnxruntime's
saved optimizations.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sftool.errors import SftoolError
from sftool.exporters.families.base import FamilyAdapter, additive_attention_mask
from torch import nn

SLIDING = "sliding_attention"


def sliding_window_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype, window: int) -> torch.Tensor:
    """``additive_attention_mask`` restricted to keys less than ``window`` positions back (transformers'
    sliding-window rule: key j is seen by query i iff i - window < j <= i). Counted in the padded
    layout, which equals counting real tokens because a row's real tokens are contiguous."""
    t = attention_mask.shape[-1]
    idx = torch.arange(t, device=attention_mask.device)
    too_far = idx[None, :] <= idx[:, None] - window  # [T,T]: key more than window-1 tokens back
    mask = additive_attention_mask(attention_mask, dtype)
    return mask.masked_fill(too_far[None, None], torch.finfo(dtype).min)


def divide_offset_weight(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    """An ``absorb`` for int8 smoothing on a Gemma RMS norm, whose output is ``normed * (1 + weight)``:
    dividing the output channel by s means ``1 + weight`` becomes ``(1 + weight) / s``."""

    def absorb(s: torch.Tensor) -> None:
        norm.weight.copy_((1.0 + norm.weight) / s - 1.0)

    return absorb


class Gemma3Adapter(FamilyAdapter):
    name = "gemma3"
    model_types = ("gemma3_text",)
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    per_token_projections = ("down_proj",)

    def backbone(self, model: nn.Module) -> nn.Module:
        inner = super().backbone(model)
        # Gemma3ForCausalLM: base_model_prefix "language_model", backbone stored as ``model``.
        nested = getattr(inner, "model", None)
        return nested if isinstance(nested, nn.Module) and hasattr(nested, "layers") else inner

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.norm

    def embedding_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        if getattr(backbone.config, "use_bidirectional_attention", False):
            # EmbeddingGemma and kin attend both ways: the causal masks below would be wrong.
            raise SftoolError("bidirectional Gemma 3 models (use_bidirectional_attention) are not supported")
        return {
            "embed_tokens": backbone.embed_tokens,
            "rotary_emb": backbone.rotary_emb,
            "rotary_emb_local": backbone.rotary_emb_local,
        }

    def embed(self, modules: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return modules["embed_tokens"](input_ids)  # lookup x sqrt(hidden), in the weights' dtype

    def context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, Any]:
        window = int(modules["rotary_emb"].config.sliding_window)
        # Both sides rebuild both masks and both rotary pairs from the same 2D mask and positions.
        return {
            "masks": {
                "full_attention": additive_attention_mask(attention_mask, hidden.dtype),
                SLIDING: sliding_window_attention_mask(attention_mask, hidden.dtype, window),
            },
            "position_embeddings_global": modules["rotary_emb"](hidden, position_ids),
            "position_embeddings_local": modules["rotary_emb_local"](hidden, position_ids),
            "position_ids": position_ids,
        }

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: dict[str, Any]) -> torch.Tensor:
        kwargs = {k: v for k, v in context.items() if k != "masks"}
        out = layer(hidden, attention_mask=context["masks"][layer.attention_type], **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def smoothing_pairs(self, block: nn.Module) -> list[tuple[Callable[[torch.Tensor], None], list[nn.Module]]]:
        from sftool.exporters.int8_prep import divide_rows

        attn, mlp = block.self_attn, block.mlp
        # post_attention_layernorm and post_feedforward_layernorm act on projection outputs: nothing to fold.
        return [
            (divide_offset_weight(block.input_layernorm), [attn.q_proj, attn.k_proj, attn.v_proj]),
            (divide_offset_weight(block.pre_feedforward_layernorm), [mlp.gate_proj, mlp.up_proj]),
            (divide_rows(mlp.up_proj), [mlp.down_proj]),
        ]

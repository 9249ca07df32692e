"""Llama (SmolLM2, Llama-3.2 and kin): rotary position embeddings computed once per forward and
passed to every block, GQA, usually tied input/output embeddings."""

from __future__ import annotations

from typing import Any, Callable

import torch
from sftool.exporters.families.base import FamilyAdapter
from sftool.exporters.token_layout import TokenLayout
from torch import nn


def _concat_linear(projections: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing several projections of the same input, outputs side by side."""
    weight = torch.cat([p.weight for p in projections]).detach()
    biases = [p.bias for p in projections]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, dtype=weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat(biases))
    return fused.requires_grad_(False)


class RMSNormDiv(nn.Module):
    """LlamaRMSNorm written as ``w * x / sqrt(mean(x^2) + eps)``: the pattern onnxruntime fuses into
    SimplifiedLayerNormalization (it does not match transformers' ``x * rsqrt(...)``)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.eps = float(norm.variance_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class RotaryTables(nn.Module):
    """cos/sin of the rotary embedding for positions 0..max_len-1, one half of the head dimension
    (what GroupQueryAttention reads). One instance serves every fused layer of a part."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        super().__init__()
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)


class FusedLlamaLayer(nn.Module):
    """Export-only LlamaDecoderLayer: the same outputs on right-padded batches, in fewer, larger kernels,
    on the real tokens only (``TokenLayout``: attention alone sees the padded layout).

    q/k/v become one projection whose packed output goes straight into ``sftool::causal_gqa``
    (onnxruntime's GroupQueryAttention, rotary embedding included), and the norms take the form
    onnxruntime fuses. It shares the norms and the other projections of ``layer``; the packed QKV
    projection is a new tensor, made after any int8 smoothing was folded in. (gate/up stay two
    projections: concatenated, the Split that parts them again costs more than the MatMul saves.)
    """

    def __init__(self, layer: nn.Module, rotary: RotaryTables):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.num_heads = int(attn.config.num_attention_heads)
        self.kv_heads = int(attn.config.num_key_value_heads)
        self.scale = float(attn.scaling)
        self.input_norm = RMSNormDiv(layer.input_layernorm)
        self.qkv_proj = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.post_attention_norm = RMSNormDiv(layer.post_attention_layernorm)
        self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.act_fn = mlp.act_fn
        self.down_proj = mlp.down_proj
        self.rotary = rotary

    def forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """tokens [T, H]: the batch's real tokens (``TokenLayout.pack``); returns the same rows."""
        from sftool.exporters.contrib_ops import causal_gqa

        qkv = layout.unpack(self.qkv_proj(self.input_norm(tokens)))
        attn = causal_gqa(qkv, layout.lengths, self.rotary.cos, self.rotary.sin, self.num_heads, self.kv_heads, self.scale)
        hidden = tokens + self.o_proj(layout.pack(attn))
        normed = self.post_attention_norm(hidden)
        return hidden + self.down_proj(self.act_fn(self.gate_proj(normed)) * self.up_proj(normed))


class LlamaAdapter(FamilyAdapter):
    name = "llama"
    model_types = ("llama",)
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    per_token_projections = ("down_proj",)

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.layers

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.norm

    def embedding_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {"embed_tokens": backbone.embed_tokens, "rotary_emb": backbone.rotary_emb}

    def embed(self, modules: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return modules["embed_tokens"](input_ids)

    def smoothing_pairs(self, block: nn.Module) -> list[tuple[Callable[[torch.Tensor], None], list[nn.Module]]]:
        from sftool.exporters.int8_prep import divide_rows, divide_weight

        attn, mlp = block.self_attn, block.mlp
        return [
            (divide_weight(block.input_layernorm), [attn.q_proj, attn.k_proj, attn.v_proj]),
            (divide_weight(block.post_attention_layernorm), [mlp.gate_proj, mlp.up_proj]),
            # down_proj reads act(gate) * up: scaling up's output channel scales that product's channel.
            (divide_rows(mlp.up_proj), [mlp.down_proj]),
        ]

    def fused_layers(self, layers: nn.ModuleList, modules: nn.ModuleDict, max_seq_len: int) -> list[nn.Module]:
        # The rotary tables the model itself computes (rope scaling and attention scaling included),
        # for positions 0..max_seq_len-1, once for all layers; cos/sin repeat over the two halves, GQA
        # takes one half.
        positions = torch.arange(max_seq_len)[None]
        probe = torch.zeros(1, max_seq_len, 1, dtype=layers[0].input_layernorm.weight.dtype)
        with torch.no_grad():
            cos, sin = modules["rotary_emb"](probe, positions)
        half = cos.shape[-1] // 2
        rotary = RotaryTables(cos[0, :, :half], sin[0, :, :half])
        return [FusedLlamaLayer(layer, rotary) for layer in layers]

    def context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, Any]:
        context = super().context(modules, hidden, attention_mask, position_ids)
        # The server recomputes cos/sin from the same position ids the device used.
        context["position_embeddings"] = modules["rotary_emb"](hidden, position_ids)
        context["position_ids"] = position_ids
        return context

    def cached_context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> dict[str, Any]:
        from sftool.exporters.families.base import cached_attention_mask

        # Each block's attention appends its new keys/values to ``cache`` (under its own layer index) and
        # attends over all of them; the rotary angles are those of the new positions' absolute places.
        query_len = hidden.shape[1]
        position_ids = self.cached_position_ids(attention_mask, query_len)
        return {
            "attention_mask": cached_attention_mask(attention_mask, query_len, hidden.dtype),
            "position_embeddings": modules["rotary_emb"](hidden, position_ids),
            "position_ids": position_ids,
            "past_key_values": cache,
        }

"""Llama (SmolLM2, Llama-3.2 and kin): rotary position embeddings computed once per forward and
passed to every block, GQA, usually tied input/output embeddings."""

from __future__ import annotations

from typing import Any, Callable

import torch
from sftool.exporters.families.base import FamilyAdapter
from torch import nn


class LlamaAdapter(FamilyAdapter):
    name = "llama"
    model_types = ("llama",)
    default_lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

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

    def context(
        self, modules: nn.ModuleDict, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> dict[str, Any]:
        context = super().context(modules, hidden, attention_mask, position_ids)
        # The server recomputes cos/sin from the same position ids the device used.
        context["position_embeddings"] = modules["rotary_emb"](hidden, position_ids)
        context["position_ids"] = position_ids
        return context

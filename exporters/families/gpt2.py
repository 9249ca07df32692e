"""GPT-2: learned position embeddings added at the embedding stage; blocks take only the mask."""

from __future__ import annotations

import torch
from sftool.exporters.families.base import FamilyAdapter
from torch import nn


class GPT2Adapter(FamilyAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    # Conv1D modules; "c_proj" matches both the attention output and the MLP output projection.
    default_lora_targets = ("c_attn", "c_proj")
    per_token_projections = ("mlp.c_proj",)
    lora_fan_in_fan_out = True

    def layers(self, backbone: nn.Module) -> nn.ModuleList:
        return backbone.h

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.ln_f

    def embedding_modules(self, backbone: nn.Module) -> dict[str, nn.Module]:
        return {"wte": backbone.wte, "wpe": backbone.wpe, "drop": backbone.drop}

    def embed(self, modules: nn.ModuleDict, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return modules["drop"](modules["wte"](input_ids) + modules["wpe"](position_ids))

    def num_layers(self, config) -> int:
        return int(config.n_layer)

    def hidden_size(self, config) -> int:
        return int(config.n_embd)

    def max_positions(self, config) -> int:
        return int(config.n_positions)

"""The keys and values of earlier positions that a part's blocks attend over when decoding token by token.

One object serves PyTorch decoding on the server and the ONNX export of the device decoder: transformers'
attention calls ``update`` with the new positions' keys and values [B, kv_heads, q, D] and gets back the
whole sequence's, which it attends over. Blocks are keyed by their layer index in the full model, so the
device part (blocks 0..k-1) and the server part (k..L-1) never collide.
"""

from __future__ import annotations

from typing import Any

import torch


class KeyValueCache:
    """Keys and values per block index, extended in place by every block call that is given it."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = dict(past or {})

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' ``key``/``value`` to block ``layer_idx``'s; return the whole sequence's."""
        if layer_idx in self.layers:
            past_key, past_value = self.layers[layer_idx]
            key, value = torch.cat([past_key, key], dim=-2), torch.cat([past_value, value], dim=-2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def length(self) -> int:
        """Positions cached (those of any one block: every block sees the same positions)."""
        return next(iter(self.layers.values()))[0].shape[-2] if self.layers else 0

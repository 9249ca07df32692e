"""Cut a transformers model at block k into the frozen device part and the server's block runner."""

from __future__ import annotations

import copy
import hashlib

import torch
from sftool.errors import SftoolError
from sftool.exporters.families.base import FamilyAdapter, position_ids_from_mask
from sftool.exporters.token_layout import TokenLayout
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_split(split: int, num_layers: int) -> None:
    """A split leaves at least one block on each side."""
    if not 1 <= split <= num_layers - 1:
        raise SftoolError(f"split {split} is out of range: the model has {num_layers} blocks, use 1..{num_layers - 1}")


class DevicePart(nn.Module):
    """Embeddings + blocks 0..k-1: (input_ids, attention_mask) -> hidden states [B,T,H].

    It holds only the modules it uses, so the ONNX file carries no server weights. Positions where
    ``attention_mask`` is 0 come out as exact zeros, fused or not.
    """

    def __init__(self, adapter: FamilyAdapter, backbone: nn.Module, split: int):
        super().__init__()
        check_split(split, len(adapter.layers(backbone)))
        self.adapter = adapter
        self.split = split
        self.embeddings = nn.ModuleDict(adapter.embedding_modules(backbone))
        self.blocks = nn.ModuleList(list(adapter.layers(backbone))[:split])
        #: True once ``fuse_blocks`` swapped in fused layers, which run on the real tokens only.
        self.fused = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = position_ids_from_mask(attention_mask)
        if self.fused:
            # Fused layers run on the real tokens only, packed as one row [1, T] from the embeddings on.
            layout = TokenLayout(attention_mask)
            tokens = self.adapter.embed(self.embeddings, layout.pack_ids(input_ids), layout.pack_ids(position_ids))[0]
            for block in self.blocks:
                tokens = block(tokens, layout)
            return layout.unpack_zero_padded(tokens)
        hidden = self.adapter.embed(self.embeddings, input_ids, position_ids)
        context = self.adapter.context(self.embeddings, hidden, attention_mask, position_ids)
        for block in self.blocks:
            hidden = self.adapter.run_layer(block, hidden, context)
        # Padding rows attend to real tokens and carry junk; zeros make the output well defined (as the
        # fused layers' is). A select, not a multiply by the mask: that leaves -0.0 under negative values.
        return hidden.masked_fill(~attention_mask.bool().unsqueeze(-1), 0.0)

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
        """Hidden states [B, q, H] of q new tokens after the positions whose keys and values ``cache``
        (a ``KeyValueCache``) holds, which the blocks extend. ``attention_mask`` [B, P+q] covers the cached
        positions and the new ones. Prefill (P = 0) then single steps equals ``forward`` on the whole
        sequence, padding positions zero as there."""
        if self.fused:
            raise SftoolError("the fused export layers do not take a key/value cache; decode with the plain part")
        query_len = input_ids.shape[1]
        position_ids = self.adapter.cached_position_ids(attention_mask, query_len)
        hidden = self.adapter.embed(self.embeddings, input_ids, position_ids)
        context = self.adapter.cached_context(self.embeddings, hidden, attention_mask, cache)
        for block in self.blocks:
            hidden = self.adapter.run_layer(block, hidden, context)
        new_mask = attention_mask.narrow(1, attention_mask.shape[1] - query_len, query_len)
        return hidden.masked_fill(~new_mask.bool().unsqueeze(-1), 0.0)

    def fused_for_export(self, max_seq_len: int) -> DevicePart:
        """A copy whose blocks are the family's fused export layers (``FamilyAdapter.fused_layers``),
        or an unchanged copy where the family has none. Only for export: it needs right padding."""
        return copy.deepcopy(self).eval().fuse_blocks(max_seq_len)

    def fuse_blocks(self, max_seq_len: int) -> DevicePart:
        """``fused_for_export`` in place, for a part that is already a private copy; returns self."""
        fused = self.adapter.fused_layers(self.blocks, self.embeddings, max_seq_len)
        if fused is not None:
            self.blocks = nn.ModuleList(fused)
            self.fused = True
        return self


class BlockRunner(nn.Module):
    """Runs blocks [start, end) of a backbone on received activations, then (optionally) the final norm.

    The server uses it for everything after the split; it rebuilds the context (mask, positions,
    rotary cos/sin) from the 2D attention mask exactly as the device did.
    """

    def __init__(self, adapter: FamilyAdapter, backbone: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.embeddings = nn.ModuleDict(adapter.embedding_modules(backbone))
        self.blocks = adapter.layers(backbone)
        self.norm = adapter.final_norm(backbone)
        #: Activation recomputation: while autograd records, keep only each block's input and run the
        #: block again in the backward (``torch.utils.checkpoint``), trading one more forward of the
        #: trained blocks for their internal activations, which dominate server memory at long rows.
        self.recompute = False

    def context(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        return self.adapter.context(self.embeddings, hidden, attention_mask, position_ids_from_mask(attention_mask))

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, end: int | None = None, norm: bool = True
    ) -> torch.Tensor:
        end = len(self.blocks) if end is None else end
        context = self.context(hidden, attention_mask)
        recompute = self.recompute and torch.is_grad_enabled()
        for i in range(start, end):
            if recompute:
                # Non-reentrant: works when the input needs no gradient (received activations), and it
                # replays the saved RNG state, so LoRA dropout draws the same mask in the recomputation.
                hidden = checkpoint(self.adapter.run_layer, self.blocks[i], hidden, context, use_reentrant=False)
            else:
                hidden = self.adapter.run_layer(self.blocks[i], hidden, context)
        return self.norm(hidden) if norm and end == len(self.blocks) else hidden

    def decode(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, cache, start: int, end: int | None = None,
        norm: bool = True,
    ) -> torch.Tensor:
        """``forward`` on new positions only: ``hidden`` [B, q, H] follows the positions whose keys and
        values ``cache`` (a ``KeyValueCache``) holds for blocks [start, end), which this call extends;
        ``attention_mask`` [B, P+q] covers both, and gives the position offset P."""
        end = len(self.blocks) if end is None else end
        context = self.adapter.cached_context(self.embeddings, hidden, attention_mask, cache)
        for i in range(start, end):
            hidden = self.adapter.run_layer(self.blocks[i], hidden, context)
        return self.norm(hidden) if norm and end == len(self.blocks) else hidden


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (name, dtype, shape, bytes).

    The export records it for the device part; the server recomputes it on its own copy of the
    same layers, so a server that loaded different weights refuses to train on the activations.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        if "inv_freq" in name or "rotary" in name:
            continue  # derived from the config, not trained weights
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        t = tensor.detach().to(torch.float32).contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()

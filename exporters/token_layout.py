"""Run the token-wise work of a right-padded batch on its real tokens only.

A device batch is padded to its longest row (8.7% of the positions of the bucketed SST-2 batches
that ``sftool bench device`` times are padding). Norms, projections and the MLP treat each token on
its own, so the fused export layers run them on the real tokens packed into one [T, C] matrix, and
go back to the padded [B, S, C] layout only where rows matter: attention, and the part's output.
The layout is computed once per batch from the attention mask (``NonZero`` in the ONNX graph).
"""

from __future__ import annotations

import torch


class TokenLayout:
    """Where the real tokens of a right-padded batch sit, and the two gathers between layouts."""

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq = attention_mask.shape
        #: Real tokens per row [B].
        self.lengths = attention_mask.sum(-1)
        #: Flat positions (b * S + t) of the real tokens, in order: row i of the packed matrix.
        self.index = torch.nonzero(attention_mask.reshape(-1)).reshape(-1)
        # For each padded position, its packed row (for attention). Padding positions read row 0: their
        # values are computed and never read, since with right padding no real token attends to them.
        device = self.index.device
        self._rows = torch.zeros(self.batch * self.seq, dtype=torch.long, device=device).scatter(
            0, self.index, torch.arange(self.index.shape[0], dtype=torch.long, device=device)
        )

    def pack_ids(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S] -> [1, T]: token ids (or positions) of the real tokens, as one row."""
        return x.reshape(1, self.batch * self.seq).index_select(1, self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, C] -> [T, C], the real tokens only."""
        return x.reshape(self.batch * self.seq, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B, S, C]; padding positions hold copies of some real token (for attention)."""
        return x.index_select(0, self._rows).reshape(self.batch, self.seq, x.shape[-1])

    def unpack_zero_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B, S, C] with zeros at padding positions (for what leaves the part)."""
        padded = x.new_zeros(self.batch * self.seq, x.shape[-1]).index_copy(0, self.index, x)
        return padded.reshape(self.batch, self.seq, x.shape[-1])

"""Make a device part friendly to int8 activations, without changing what it computes in fp32.

onnxruntime's fast int8 MatMuls (``DynamicQuantizeMatMul``, ``MatMulIntegerToFloat``) quantize the
activation with one scale for the whole tensor. Real LLMs break that: a few tokens carry "massive
activations" and a few input channels carry outliers (SmolLM2-135M block 2: |x| up to 96 entering
``down_proj`` while 99.9% of values are below 1), so one scale leaves the other values a handful of
int8 levels. Two exact rewrites fix most of it before export:

- **Smoothing** (SmoothQuant, Xiao et al. 2023): for a projection whose input channels come straight
  out of a per-channel op (a norm's weight, ``up_proj``'s rows), divide that producer's channel j by
  ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)`` and multiply the projection's column j by ``s_j``.
  The product is unchanged; the outlier channels shrink and the weights absorb them (they are
  quantized per output channel, where this costs little). Scales come from calibration text.
- **Per-token scales** on the MLP output projection (``FamilyAdapter.per_token_projections``):
  ``((x / s_t) @ W) * s_t`` with ``s_t = max_j |x_tj|``, so the per-tensor int8 scale that onnxruntime
  picks at run time is, in effect, one scale per token. That is where "massive activation" tokens
  reach a projection; a norm's output rows, and attention over them, are already on one scale. In
  fp32 the rewrite is exact to rounding.

Measured on SmolLM2-135M split 6 (docs/device.md), mean cosine to fp32 on 128 SST-2 rows: 0.989 with
smoothing alone, 0.9980 with this recipe, 0.9988 with per-token scales on every projection (and the
MLP output in 3 channel groups), which cost more time and gave the same SST-2 answers.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from sftool.exporters.quantize import SMOOTH_ALPHA
from torch import nn


def _weight_out_in(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [out, in], bias) of an nn.Linear or a GPT-2 style Conv1D (weight stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    return module.weight.t(), module.bias


def is_projection(module: nn.Module) -> bool:
    """A dense projection with a constant weight: nn.Linear or transformers' Conv1D."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class PerTokenLinear(nn.Module):
    """``x @ W^T + b`` computed as ``((x / s) @ W^T) * s + b``, with ``s`` the max |x| of each token.

    Identical to the wrapped projection in fp32; after export, the MatMul sees rows scaled to [-1, 1],
    so the per-tensor int8 scale chosen at run time is, in effect, one scale per token. The weight is
    a separate [in, out] parameter so it becomes a constant MatMul input the quantizer can find.
    """

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight_out_in.t().contiguous().detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The clamp keeps an all-zero row (e.g. a zero padding embedding) from dividing by zero.
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
        # One reciprocal per token and a multiply: dividing every element costs more (vdivps).
        out = torch.matmul(x * scale.reciprocal(), self.weight) * scale
        return out if self.bias is None else out + self.bias


def input_absmax(part: nn.Module, batch: tuple[np.ndarray, np.ndarray]) -> dict[nn.Module, torch.Tensor]:
    """Per input channel max |x| entering every projection of ``part.blocks`` on ``batch`` (real tokens only)."""
    ids, mask = (torch.from_numpy(a) for a in batch)
    real = mask.bool()
    stats: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        x = x[real] if x.shape[:2] == real.shape else x.flatten(0, -2)
        stats[module] = torch.maximum(stats.get(module, torch.zeros(x.shape[-1])), x.abs().amax(0))

    hooks = [m.register_forward_pre_hook(record) for m in part.blocks.modules() if is_projection(m)]
    try:
        with torch.no_grad():
            part(ids, mask)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def smooth(part: nn.Module, pairs: list[tuple[Callable[[torch.Tensor], None], list[nn.Module]]], stats: dict, alpha: float) -> None:
    """Apply SmoothQuant scales in place: each pair is (divide the producer's channels by s, consumers)."""
    with torch.no_grad():
        for absorb, consumers in pairs:
            xmax = stats[consumers[0]].clamp(min=1e-5)
            wmax = torch.stack([_weight_out_in(c)[0].abs().amax(0) for c in consumers]).amax(0).clamp(min=1e-5)
            s = (xmax.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
            absorb(s)
            for consumer in consumers:
                _weight_out_in(consumer)[0].mul_(s[None, :])  # a view for Conv1D: scales its rows in place


def _smoothing_pairs(part: nn.Module, alpha: float) -> list:
    """The smoothing pairs of every block, none when smoothing is off (alpha 0) or the family has none."""
    if alpha <= 0:
        return []
    return [pair for block in part.blocks for pair in part.adapter.smoothing_pairs(block)]


def int8_rewrite_note(device_part: nn.Module, alpha: float = SMOOTH_ALPHA) -> str:
    """What ``prepare_for_int8`` does to this part, as recorded in each int8 variant's method."""
    smoothing = f"smoothquant alpha={alpha:g}, " if _smoothing_pairs(device_part, alpha) else ""
    return smoothing + f"per-token activation scales on {', '.join(device_part.adapter.per_token_projections)}"


def prepare_for_int8(
    device_part: nn.Module,
    calibration: tuple[np.ndarray, np.ndarray],
    alpha: float = SMOOTH_ALPHA,
    fuse_max_seq_len: int | None = None,
) -> nn.Module:
    """A copy of ``device_part`` with smoothing (where the family names the pairs) and per-token scales
    on the family's ``per_token_projections``, equal to it in fp32 up to rounding; export this copy,
    then quantize it.

    With ``fuse_max_seq_len``, the blocks become the family's fused export layers after smoothing (so
    concatenated projections carry the smoothed weights) and before the per-token rewrite.
    """
    part = copy.deepcopy(device_part).eval()
    pairs = _smoothing_pairs(part, alpha)
    if pairs:
        smooth(part, pairs, input_absmax(part, calibration), alpha)
    if fuse_max_seq_len is not None:
        part.fuse_blocks(fuse_max_seq_len)
    wanted = part.adapter.per_token_projections
    for block in part.blocks:
        for qualified, child in list(block.named_modules()):
            if is_projection(child) and any(qualified == w or qualified.endswith("." + w) for w in wanted):
                parent, _, name = qualified.rpartition(".")
                setattr(block.get_submodule(parent), name, PerTokenLinear(*_weight_out_in(child)))
    return part


def divide_rows(module: nn.Module) -> Callable[[torch.Tensor], None]:
    """An ``absorb`` for smoothing: divide a projection's output channel j (weight row, bias) by s_j."""

    def absorb(s: torch.Tensor) -> None:
        weight, bias = _weight_out_in(module)
        weight.div_(s[:, None])  # a view for Conv1D: divides its columns in place
        if bias is not None:
            bias.div_(s)

    return absorb


def divide_weight(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    """An ``absorb`` for smoothing: divide a norm's per-channel weight (and bias, if any) by s."""

    def absorb(s: torch.Tensor) -> None:
        norm.weight.div_(s)
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s)

    return absorb



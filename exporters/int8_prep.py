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
- **Per-token scales**: every projection becomes ``((x / s_t) @ W) * s_t`` with ``s_t = max_j |x_tj|``
  per token (and per group of input channels for the wide MLP output projection), so the
  per-tensor int8 scale that onnxruntime picks at run time is, in effect, one scale per token (and
  group). In fp32 the rewrite is exact to rounding; the extra ops cost ~14% of the int8 model's time.

Measured on SmolLM2-135M split 6 (docs/device.md): mean cosine to fp32 0.967 (plain per-tensor int8)
-> 0.9988, and the split model's zero-shot SST-2 answers agree with fp32 on 98% of rows instead of 73%
(94.5% with the MLP output projections kept fp32, the previous recipe, which was also 1.27x slower).
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
    """``x @ W^T + b`` computed as ``sum_g ((x_g / s_g) @ W_g^T) * s_g + b``, with ``s_g`` the max |x| of
    each token over input-channel group g.

    Identical to the wrapped projection in fp32; after export, the MatMul sees rows scaled to [-1, 1],
    so a per-tensor int8 scale chosen at run time is as good as a per-token (per-group) one. The
    group weights are separate [in_g, out] parameters so each becomes a constant MatMul input the
    quantizer can find.
    """

    def __init__(self, weight_out_in: torch.Tensor, bias: torch.Tensor | None, groups: int = 1):
        super().__init__()
        in_features = weight_out_in.shape[1]
        if groups < 1 or in_features % groups:
            raise ValueError(f"{in_features} input channels do not split into {groups} equal groups")
        self.size = in_features // groups
        self.weights = nn.ParameterList(
            nn.Parameter(weight_out_in[:, g * self.size : (g + 1) * self.size].t().contiguous().detach(), requires_grad=False)
            for g in range(groups)
        )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for g, weight in enumerate(self.weights):
            xg = x if len(self.weights) == 1 else x[..., g * self.size : (g + 1) * self.size]
            # The clamp keeps an all-zero row (e.g. a zero padding embedding) from dividing by zero.
            scale = xg.abs().amax(dim=-1, keepdim=True).clamp(min=1e-6)
            part = torch.matmul(xg / scale, weight) * scale
            out = part if out is None else out + part
        return out if self.bias is None else out + self.bias


def groups_for(in_features: int, hidden_size: int) -> int:
    """Input-channel groups for a projection: the fewest equal groups no wider than the hidden size.

    Only the MLP's output projection contracts more than ``hidden_size`` channels (SmolLM2: 1536 ->
    3 groups of 512; GPT-2: 3072 -> 4 of 768); its input, after the gated/GELU nonlinearity, is where the
    outliers are, and finer groups cut its int8 error most.
    """
    return next(g for g in range(1, in_features + 1) if in_features % g == 0 and in_features // g <= hidden_size)


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
    return smoothing + "per-token activation scales"


def prepare_for_int8(
    device_part: nn.Module, calibration: tuple[np.ndarray, np.ndarray], hidden_size: int, alpha: float = SMOOTH_ALPHA
) -> nn.Module:
    """A copy of ``device_part`` with smoothing (where the family names the pairs) and per-token
    projections, equal to it in fp32 up to rounding; export this copy, then quantize it."""
    part = copy.deepcopy(device_part).eval()
    pairs = _smoothing_pairs(part, alpha)
    if pairs:
        smooth(part, pairs, input_absmax(part, calibration), alpha)
    for block in part.blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if is_projection(child):
                    weight, bias = _weight_out_in(child)
                    setattr(parent, name, PerTokenLinear(weight, bias, groups_for(weight.shape[1], hidden_size)))
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



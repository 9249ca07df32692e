"""The device decoder: the device part with past key/value inputs and present outputs, as ONNX.

``device.decode.onnx`` runs q new tokens after P cached positions: inputs ``input_ids`` [B, q],
``attention_mask`` [B, P+q] (the cached positions and the new ones) and, per device block i,
``past_key_values.i.key``/``.value`` [B, kv_heads, P, D]; outputs ``hidden_states`` [B, q, H] (what
``device.onnx`` gives at those positions) and ``present.i.key``/``.value`` [B, kv_heads, P+q, D], the next
call's past. A prompt is one call with P = 0; each generated token one call with q = 1.

It is the plain graph (standard ONNX, the transformers blocks as exported), not the fused layers: the
fused GroupQueryAttention keeps its cache as a buffer of fixed length that it writes at each row's
``seqlens_k``, which is exact for right-padded prompts but needs the runtime to manage that buffer;
the plain graph's concatenated cache is exact at any padding and fast enough for one token at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from sftool.errors import SftoolError
from sftool.exporters.kv_cache import KeyValueCache
from sftool.runtime.manifest import DecoderFile
from torch import nn

DECODER_ONNX = "device.decode.onnx"
HIDDEN_OUTPUT = "hidden_states"


def cache_names(blocks: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value for each block in order."""
    past = [f"past_key_values.{i}.{kind}" for i in range(blocks) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(blocks) for kind in ("key", "value")]
    return past, present


class DecoderGraph(nn.Module):
    """Export-only wrapper of a ``DevicePart``: flat past tensors in, hidden states and presents out."""

    def __init__(self, device_part: nn.Module):
        super().__init__()
        self.part = device_part

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        blocks = len(self.part.blocks)
        cache = KeyValueCache({i: (past[2 * i], past[2 * i + 1]) for i in range(blocks)})
        hidden = self.part.decode(input_ids, attention_mask, cache)
        return (hidden, *[t for i in range(blocks) for t in cache.layers[i]])


def cache_shape(device_part: nn.Module) -> tuple[int, int]:
    """(kv_heads, head_dim) of the device part's attention (Llama family)."""
    attn = device_part.blocks[0].self_attn
    config = attn.config
    return int(config.num_key_value_heads), int(attn.head_dim)


def export_decoder(device_part: nn.Module, path: Path, opset: int, vocab_size: int, seed: int = 0) -> None:
    """Write the decoder graph of ``device_part`` (plain blocks, eval mode) to ``path``."""
    blocks = len(device_part.blocks)
    kv_heads, head_dim = cache_shape(device_part)
    past_names, present_names = cache_names(blocks)
    rng = np.random.default_rng(seed)
    batch, past_len, new_len = 2, 3, 2
    ids = torch.from_numpy(rng.integers(0, vocab_size, size=(batch, new_len), dtype=np.int64))
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    past = tuple(torch.zeros(batch, kv_heads, past_len, head_dim) for _ in past_names)
    # The mask's length is the past's plus the new tokens': torch.export finds that relation itself (AUTO).
    auto = torch.export.Dim.AUTO
    shapes = {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "past": tuple({0: auto, 2: auto} for _ in past_names),
    }
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DecoderGraph(device_part).eval(), (ids, mask, *past), str(path),
            input_names=["input_ids", "attention_mask", *past_names], output_names=[HIDDEN_OUTPUT, *present_names],
            dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True, external_data=False,
        )


def decode_parity(path: Path, device_part: nn.Module, prompt: np.ndarray, steps: int, vocab_size: int,
                  settings=None) -> dict[str, float]:
    """Prefill ``prompt`` [B, P] then ``steps`` single tokens through the ONNX decoder at ``path``, against
    the PyTorch device part's full forward of the whole sequence; max abs diff over real positions."""
    from sftool.exporters.onnx_export import compare_outputs
    from sftool.runtime.decoder_session import DecoderSession

    batch, prompt_len = prompt.shape
    rng = np.random.default_rng(1)
    tail = rng.integers(0, vocab_size, size=(batch, steps), dtype=np.int64)
    ids = np.concatenate([prompt, tail], axis=1)
    mask = np.ones_like(ids)
    if prompt_len > 2:
        mask[0, :2] = 0  # a left-padded row, as batched prompts are
    session = DecoderSession.from_file(path, _decoder_file(device_part, path.name), settings)
    pieces = [session.run(prompt, mask[:, :prompt_len])]
    for t in range(prompt_len, ids.shape[1]):
        pieces.append(session.run(ids[:, t : t + 1], mask[:, t : t + 1]))
    with torch.no_grad():
        reference = device_part(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    result = compare_outputs(reference, np.concatenate(pieces, axis=1), mask)
    result.update({"prompt_tokens": int(prompt_len), "steps": int(steps), "batch": int(batch)})
    return result


def _decoder_file(device_part: nn.Module, file: str, parity: dict | None = None) -> DecoderFile:
    blocks = len(device_part.blocks)
    kv_heads, head_dim = cache_shape(device_part)
    past_names, present_names = cache_names(blocks)
    return DecoderFile(file=file, blocks=blocks, kv_heads=kv_heads, head_dim=head_dim, past_inputs=past_names,
                       present_outputs=present_names, parity=parity or {})


def write_decoder(device_part: nn.Module, staging: Path, opset: int, vocab_size: int, prompt: np.ndarray,
                  tolerance: float, log) -> DecoderFile:
    """Export ``device.decode.onnx`` into ``staging``, check prefill + steps against the full PyTorch
    forward (SftoolError past ``tolerance`` x max |activation|), and describe it for the manifest."""
    from sftool.exporters.portable import require_standard_onnx

    if getattr(device_part, "fused", False):
        raise SftoolError("the decoder is exported from the plain device part, not the fused one")
    if device_part.adapter.name != "llama":
        raise SftoolError(f"a decoder with a key/value cache is not supported yet for the {device_part.adapter.name} family")
    path = Path(staging) / DECODER_ONNX
    log(f"exporting the decoder with a key/value cache ({DECODER_ONNX})")
    export_decoder(device_part, path, opset, vocab_size)
    require_standard_onnx(path)
    parity = decode_parity(path, device_part, prompt, 8, vocab_size)
    if parity["max_abs_diff"] > tolerance * max(1.0, parity["ref_max_abs"]):
        raise SftoolError(f"the ONNX decoder (prefill + steps) differs from PyTorch by {parity['max_abs_diff']:.2e}; not writing it")
    log(f"decoder parity ok (prefill {parity['prompt_tokens']} + {parity['steps']} steps): "
        f"max abs diff {parity['max_abs_diff']:.2e}")
    return _decoder_file(device_part, DECODER_ONNX, parity)

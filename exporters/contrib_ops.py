"""onnxruntime contrib ops that the dynamo exporter cannot produce on its own, as torch custom ops.

A family's export-time layer (``FamilyAdapter.fused_layer``) calls these ops; in PyTorch they run
their eager reference, and ``torch.onnx.export(..., custom_translation_table=TRANSLATIONS)`` writes
each as the one onnxruntime kernel that does the same work. onnxruntime's own fusions do not find
attention in a dynamo graph (rotary, repeat-KV, mask and softmax arrive as ~60 small nodes per
block), and those nodes cost as much as the int8 projections on short device batches.

- ``sftool::causal_gqa`` -> ``com.microsoft.GroupQueryAttention`` (rotary embedding applied inside,
  grouped K/V heads, causal). It assumes **right padding**: a real token then only sees real tokens
  before it, so causality alone is the exact mask for every real position (padding positions get
  finite values nobody reads). The device runtime refuses left-padded batches for that reason. Each
  row's real length goes to the kernel (``seqlens_k``), which then skips the padding rows' work.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx.defs import OpSchema

MSFT_DOMAIN = "com.microsoft"


def _register_gqa_schema() -> None:
    """Make ``com.microsoft.GroupQueryAttention`` known to onnx (which ships only the standard ops), so
    onnxscript can emit it. The inputs and attributes are onnxruntime's, as many as sftool uses."""
    if onnx.defs.has("GroupQueryAttention", MSFT_DOMAIN):
        return
    optional = OpSchema.FormalParameterOption.Optional

    def param(name: str, type_str: str, is_optional: bool = False) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, type_str, param_option=optional if is_optional else OpSchema.FormalParameterOption.Single)

    schema = OpSchema(
        "GroupQueryAttention",
        MSFT_DOMAIN,
        1,
        inputs=[
            param("query", "T"),
            param("key", "T", True),
            param("value", "T", True),
            param("past_key", "T", True),
            param("past_value", "T", True),
            param("seqlens_k", "M"),
            param("total_sequence_length", "M"),
            param("cos_cache", "T", True),
            param("sin_cache", "T", True),
        ],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("kv_num_heads", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("do_rotary", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("rotary_interleaved", OpSchema.AttrType.INT, ""),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, ""),
        ],
    )
    onnx.defs.register_schema(schema)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves layout (Llama's ``rotate_half``): x [B, N, S, D], cos/sin [S, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@torch.library.custom_op("sftool::causal_gqa", mutates_args=())
def causal_gqa(
    qkv: torch.Tensor,
    lengths: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    num_heads: int,
    kv_heads: int,
    scale: float,
) -> torch.Tensor:
    """Causal grouped-query attention with rotary positions 0..S-1 on right-padded rows.

    qkv [B, S, (num_heads + 2 * kv_heads) * D]: queries, keys and values packed side by side (one
    projection makes them; no split copies them apart). lengths [B]: real tokens per row (only the
    ONNX kernel uses them, to skip padding; causality alone is exact on real tokens). cos/sin caches
    [max_len, D/2]. Returns [B, S, num_heads * D], the heads concatenated (what the output projection
    reads).
    """
    batch, seq, width = qkv.shape
    head_dim = width // (num_heads + 2 * kv_heads)
    query, key, value = qkv.split([num_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    cos, sin = cos_cache[:seq], sin_cache[:seq]
    q = _rotate(query.reshape(batch, seq, num_heads, head_dim).transpose(1, 2), cos, sin)
    k = _rotate(key.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2), cos, sin)
    v = value.reshape(batch, seq, kv_heads, head_dim).transpose(1, 2)
    groups = num_heads // kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(batch, seq, -1)


@causal_gqa.register_fake
def _causal_gqa_shape(qkv, lengths, cos_cache, sin_cache, num_heads, kv_heads, scale):
    head_dim = qkv.shape[-1] // (num_heads + 2 * kv_heads)
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], num_heads * head_dim)


def _causal_gqa_onnx(qkv, lengths, cos_cache, sin_cache, num_heads: int, kv_heads: int, scale: float):
    import onnxscript
    from onnxscript import opset18 as op

    _register_gqa_schema()
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)
    seq = op.Slice(op.Shape(qkv), [1], [2])
    int32 = onnx.TensorProto.INT32
    # No cache: every row is a fresh prompt, right-padded to the batch's length; seqlens_k counts the
    # row's tokens minus one (onnxruntime's convention), at least 0: the kernel rejects -1, and a row
    # that is all padding has no output anyone reads.
    seqlens_k = op.Cast(op.Max(op.Sub(lengths, [1]), op.Constant(value_ints=[0])), to=int32)
    total = op.Cast(op.Squeeze(seq, [0]), to=int32)
    # Packed QKV: key and value stay empty and the kernel reads all three from one tensor.
    out, _present_k, _present_v = msft.GroupQueryAttention(
        qkv, None, None, None, None, seqlens_k, total, cos_cache, sin_cache,
        num_heads=num_heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0, scale=scale,
    )
    return out


#: The attributes sftool sets on each contrib op it emits. When onnxruntime saves an optimized model it
#: writes every attribute it knows, defaults included (1.32 adds 8 to GroupQueryAttention), and older
#: onnxruntime builds on the boards reject a node with an attribute they do not know.
EMITTED_ATTRIBUTES = {(MSFT_DOMAIN, "GroupQueryAttention"): {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "scale"}}


def drop_saved_defaults(path: Path) -> None:
    """Remove from sftool's contrib nodes in ``path`` the attributes onnxruntime added when saving (its
    defaults): the node is then the one sftool exported, and loads on older onnxruntime too. Only the
    graph is rewritten: external data (``<path>.data``) stays as it is."""
    model = onnx.load(str(path), load_external_data=False)
    changed = False
    for node in model.graph.node:
        keep = EMITTED_ATTRIBUTES.get((node.domain, node.op_type))
        if keep is None:
            continue
        for attribute in [a for a in node.attribute if a.name not in keep]:
            node.attribute.remove(attribute)
            changed = True
    if changed:
        onnx.save(model, str(path))


#: ``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.
TRANSLATIONS = {torch.ops.sftool.causal_gqa.default: _causal_gqa_onnx}

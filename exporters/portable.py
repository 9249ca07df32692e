"""Is an ONNX file standard ONNX, loadable by any ONNX runtime, or does it need onnxruntime?

onnxruntime's saved optimizations and sftool's fused layers write contrib ops: some in their own
domain (``com.microsoft.GroupQueryAttention``, ``DynamicQuantizeMatMul``), some in the standard
domain under names the standard does not have (``SimplifiedLayerNormalization``). The checker finds
the second kind; the first it skips (a custom domain may hold anything, and sftool registers the
schema of GroupQueryAttention with onnx to export it), hence the domain check first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx
from sftool.errors import SftoolError

#: Operator domains of the ONNX standard ("" is ai.onnx).
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, those of subgraphs (If, Loop, Scan) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _nodes(sub)


def non_standard_ops(model: onnx.ModelProto) -> list[str]:
    """``domain.op`` of the nodes outside the standard domains (calls of the model's own functions
    are standard ONNX and not listed)."""
    local = {(f.domain, f.name) for f in model.functions}
    nodes = [*_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    return sorted({f"{n.domain}.{n.op_type}" for n in nodes if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in local})


def standard_onnx_problem(path: Path) -> str | None:
    """Why ``path`` is not standard ONNX (one line), or None when it is: standard domains only and
    ``onnx.checker.check_model(full_check=True)`` passes (strict shape inference included)."""
    foreign = non_standard_ops(onnx.load(str(path), load_external_data=False))
    if foreign:
        return f"operators outside the ONNX standard: {', '.join(foreign)}"
    try:
        # By path: the checker then also handles files over protobuf's 2 GB limit.
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def file_runtime(path: Path) -> str:
    """``"onnx"`` where ``path`` is standard ONNX, else ``"onnxruntime"`` (a Variant's ``runtime``)."""
    return "onnx" if standard_onnx_problem(path) is None else "onnxruntime"


def require_standard_onnx(path: Path) -> None:
    """Raise SftoolError unless ``path`` is standard ONNX."""
    problem = standard_onnx_problem(path)
    if problem is not None:
        raise SftoolError(f"{Path(path).name} is not standard ONNX ({problem}); not writing it")

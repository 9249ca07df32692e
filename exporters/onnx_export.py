"""`sftool export`: write the frozen device part as ONNX, check it against PyTorch, write the manifest."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from sftool import __version__
from sftool.errors import SftoolError
from sftool.exporters.quantize import SMOOTH_ALPHA
from sftool.runtime.manifest import MANIFEST_NAME, Manifest, Variant, sha256_file, write_manifest

EXPORTERS = ("dynamo", "torchscript")
#: Graph optimizations an export may save: portable across CPUs (ORT_ENABLE_ALL is not).
GRAPH_OPTIMIZATIONS = ("extended", "basic", "none")
DEVICE_ONNX = "device.onnx"
INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "hidden_states"
#: Largest acceptable ORT-vs-PyTorch difference of the fp32 export, on real (non-padding) positions,
#: relative to the largest activation magnitude (at least 1). Real models carry "massive activations"
#: (SmolLM2 reaches |h| ~ 800 after block 5), where float32 rounding alone gives ~1e-3 absolute.
FP32_PARITY_TOLERANCE = 1e-4


@dataclass
class ExportOptions:
    source: str
    split: int
    out: Path
    max_seq_len: int = 512
    max_batch: int = 64
    exporter: str = "dynamo"
    opset: int = 18
    int8_targets: list[str] = field(default_factory=list)
    seed: int = 0
    #: onnxruntime graph optimization saved into the files: "extended" (default) or "basic" -- both
    #: portable to ARM64 -- or "none". ("all" adds layouts specific to the exporting CPU: refused.)
    graph_optimization: str = "extended"
    #: SmoothQuant migration strength for the int8 variants (0 turns smoothing off).
    int8_smooth_alpha: float = SMOOTH_ALPHA


def _prepare_out(out: Path) -> None:
    """Refuse to clobber a folder that holds something other than an sftool export."""
    if out.exists():
        if not out.is_dir():
            raise SftoolError(f"output {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise SftoolError(f"output folder {out} is not empty and is not an sftool export; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SftoolError(f"cannot create {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK):
        raise SftoolError(f"output folder {out.parent} is not writable")


def _export_onnx(module, path: Path, exporter: str, opset: int, example: tuple) -> None:
    import logging

    import torch

    # The exporter logs a warning per missing optional op library (torchvision); not our concern.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    axes = {"batch": 0, "seq": 1}
    dynamic_axes = {name: dict((v, k) for k, v in axes.items()) for name in [*INPUT_NAMES, OUTPUT_NAME]}
    dynamo = exporter == "dynamo"
    # The dynamo exporter writes external data unless told not to, and narrates every stage on
    # stdout; keep the CLI's output readable. Fused layers call sftool's contrib ops (dynamo only).
    extra = {}
    if dynamo:
        from sftool.exporters.contrib_ops import TRANSLATIONS

        extra = {"external_data": False, "custom_translation_table": TRANSLATIONS}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic_axes,
            opset_version=max(opset, 18) if dynamo else opset,
            dynamo=dynamo,
            **extra,
        )


def parity_inputs(vocab_size: int, shapes: list[tuple[int, int]], seed: int, pad_id: int):
    """Random token batches with right padding (one short row each), for parity checks."""
    rng = np.random.default_rng(seed)
    batches = []
    for b, t in shapes:
        ids = rng.integers(0, vocab_size, size=(b, t), dtype=np.int64)
        mask = np.ones((b, t), dtype=np.int64)
        mask[0, max(1, t // 2) :] = 0
        ids[mask == 0] = pad_id
        batches.append((ids, mask))
    return batches


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Max abs diff and per-token cosine similarity over real (non-padding) positions."""
    ref = reference[mask.astype(bool)].astype(np.float64)
    cand = candidate[mask.astype(bool)].astype(np.float64)
    cos = (ref * cand).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(cand, axis=-1) + 1e-12)
    return {
        "max_abs_diff": float(np.abs(ref - cand).max()),
        "ref_max_abs": float(np.abs(ref).max()),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
    }


def export_device(opts: ExportOptions, log: Callable[[str], None] = print) -> Manifest:
    """Export the device part of ``opts.source`` at ``opts.split`` into ``opts.out``.

    Everything is written into a temporary folder beside ``out`` and moved into place at the end,
    so a failed export never leaves a half-written artifacts folder behind.
    """
    import onnx
    import torch
    from sftool.exporters.families import adapter_for
    from sftool.exporters.int8_prep import int8_rewrite_note, prepare_for_int8
    from sftool.exporters.model_source import load_model, load_tokenizer, pad_token_id
    from sftool.exporters.partition import DevicePart, check_split, weights_fingerprint
    from sftool.exporters.quantize import (
        calibration_batch,
        ort_optimize,
        ort_parity,
        quantize_variants,
        resolve_targets,
        torch_reference,
    )
    from sftool.runtime.onnx_model import open_session

    if opts.exporter not in EXPORTERS:
        raise SftoolError(f"--exporter must be one of {', '.join(EXPORTERS)}")
    if opts.graph_optimization not in GRAPH_OPTIMIZATIONS:
        raise SftoolError(f"graph optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)} (portable to ARM64)")
    targets = resolve_targets(opts.int8_targets)  # fail on a bad --int8 before loading anything
    out = Path(opts.out)
    _prepare_out(out)
    started = time.perf_counter()
    log(f"loading {opts.source}")
    model = load_model(opts.source, head="base")
    adapter = adapter_for(model.config.model_type)
    num_layers = adapter.num_layers(model.config)
    check_split(opts.split, num_layers)
    tokenizer = load_tokenizer(opts.source)
    pad_id = pad_token_id(tokenizer)
    max_seq_len = min(opts.max_seq_len, adapter.max_positions(model.config))
    device_part = DevicePart(adapter, adapter.backbone(model), opts.split).eval()
    vocab = int(model.config.vocab_size)

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log(f"exporting {adapter.name} blocks 0..{opts.split - 1} of {num_layers} to ONNX ({opts.exporter})")
        example = parity_inputs(vocab, [(2, 8)], opts.seed, pad_id)[0]
        plain = staging / f".{DEVICE_ONNX}.plain"  # as exported
        # Fused layers (onnxruntime contrib kernels) exist only for the dynamo exporter.
        fuse = opts.exporter == "dynamo"
        export_part = device_part.fused_for_export(max_seq_len) if fuse else device_part
        _export_onnx(export_part, plain, opts.exporter, opts.opset, tuple(map(torch.from_numpy, example)))
        proto = onnx.load(str(plain))
        onnx.checker.check_model(proto)
        opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opts.opset)
        del proto
        if opts.graph_optimization == "none":
            shutil.copyfile(plain, staging / DEVICE_ONNX)
        else:
            log(f"saving the graph optimized by onnxruntime ({opts.graph_optimization}, portable to ARM64)")
            ort_optimize(plain, staging / DEVICE_ONNX, opts.graph_optimization)

        log("checking the saved model with onnxruntime against PyTorch at two shapes")
        session = open_session(staging / DEVICE_ONNX)  # as a device loads it
        shapes = [(2, 7), (3, min(33, max_seq_len))]
        parity: dict[str, dict[str, float]] = {}
        for ids, mask in parity_inputs(vocab, shapes, opts.seed + 1, pad_id):
            got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
            parity[f"{ids.shape[0]}x{ids.shape[1]}"] = compare_outputs(torch_reference(device_part, (ids, mask)), got, mask)
        del session
        worst = max(p["max_abs_diff"] for p in parity.values())
        scale = max(1.0, max(p["ref_max_abs"] for p in parity.values()))
        if worst > FP32_PARITY_TOLERANCE * scale:
            raise SftoolError(
                f"ONNX export differs from PyTorch by {worst:.2e} (> {FP32_PARITY_TOLERANCE} x max |activation| "
                f"{scale:.3g}); not writing it"
            )
        log(f"parity ok: max abs diff {worst:.2e}")

        tokenizer.save_pretrained(str(staging))
        # Every variant's parity is also measured on real text, the same batch for all.
        calibration = calibration_batch(staging, tokenizer, max_seq_len, pad_id)
        reference = torch_reference(device_part, calibration)
        text_parity = ort_parity(staging / DEVICE_ONNX, calibration, reference)
        fused_note = " + fused layers" if export_part.fused else ""
        method = f"torch.onnx/{opts.exporter}{fused_note}" + ("" if opts.graph_optimization == "none" else f" + ort.{opts.graph_optimization}")
        variants = [Variant(DEVICE_ONNX, "fp32", "any", method, text_parity)]
        plain.unlink()
        if targets:
            note = int8_rewrite_note(device_part, opts.int8_smooth_alpha)
            log(f"rewriting the device part for int8 activations ({note}) and exporting it")
            prepared = prepare_for_int8(
                device_part, calibration, opts.int8_smooth_alpha,
                fuse_max_seq_len=max_seq_len if fuse else None,
            )
            int8_source = staging / f".{DEVICE_ONNX}.int8-source"
            _export_onnx(prepared, int8_source, opts.exporter, opts.opset, tuple(map(torch.from_numpy, example)))
            del prepared
            variants += quantize_variants(
                staging, targets, calibration, reference, log,
                source_model=int8_source, recipe_note=note, graph_optimization=opts.graph_optimization,
            )
            int8_source.unlink()

        files = {
            str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest = Manifest(
            family=adapter.name,
            source=str(opts.source),
            split=opts.split,
            num_layers=num_layers,
            hidden_size=adapter.hidden_size(model.config),
            max_seq_len=max_seq_len,
            max_batch=opts.max_batch,
            pad_token_id=pad_id,
            variants=variants,
            files=files,
            weights_fingerprint=weights_fingerprint(device_part),
            opset=opset,
            inputs=[
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
            ],
            outputs=[{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", "seq", adapter.hidden_size(model.config)]}],
            parity={
                "fp32_vs_torch": parity,
                "calibration": {"texts": int(calibration[0].shape[0]), "tokens": int(calibration[1].sum())},
            },
            created_by=f"sftool {__version__}",
        )
        write_manifest(staging, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out} in {time.perf_counter() - started:.1f}s")
    return manifest

"""`sftool export`: write the frozen device part as ONNX (standard, and optimized for onnxruntime), check it
against PyTorch, write the manifest."""

from __future__ import annotations

import contextlib
import gc
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
from sftool.exporters.external_data import (
    EXTERNAL_DATA_THRESHOLD,
    move_model,
    place_weights,
    remove_model,
    wants_external,
)
from sftool.exporters.quantize import SMOOTH_ALPHA
from sftool.runtime.manifest import MANIFEST_NAME, Manifest, Variant, sha256_file, write_manifest

EXPORTERS = ("dynamo", "torchscript")
#: Graph optimizations an export may save: portable across CPUs (ORT_ENABLE_ALL is not).
GRAPH_OPTIMIZATIONS = ("extended", "basic", "none")
#: The fp32 model in standard ONNX: what any ONNX runtime loads.
DEVICE_ONNX = "device.onnx"
#: The same model for onnxruntime: fused contrib kernels, graph optimizations saved.
OPTIMIZED_ONNX = "device.ort.onnx"
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
    #: onnxruntime graph optimization saved into the onnxruntime files (``device.ort.onnx``, int8):
    #: "extended" (default) or "basic" -- both portable to ARM64 -- or "none". ("all" adds layouts
    #: specific to the exporting CPU: refused.) ``device.onnx`` is always the plain standard graph.
    graph_optimization: str = "extended"
    #: SmoothQuant migration strength for the int8 variants (0 turns smoothing off).
    int8_smooth_alpha: float = SMOOTH_ALPHA
    #: A model file with more weight bytes than this keeps its weights in ``<file>.data`` beside it
    #: (ONNX external data; protobuf cannot hold more than 2 GiB in one file). Every data file is in
    #: the manifest's ``files``.
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    #: Also write ``device.decode.onnx``: the device part with a key/value cache, for generation.
    with_decoder: bool = False


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


def module_bytes(module) -> int:
    """Bytes of a torch module's parameters and buffers, each tensor counted once (tied weights)."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _release_matched_graphs() -> None:
    """Drop the graph each of onnxscript's pattern matchers keeps from its last run.

    The dynamo exporter optimizes its graph with onnxscript's rewrite rules, module-level objects whose
    matchers hold the last graph they looked at, and through it the exported module's weights, until
    their next run: a dead copy of the model (4 GB for Llama-3.2-3B at split 6) that would stay resident
    while onnxruntime quantizes. Every match sets these fields afresh, so clearing them is safe; where
    onnxscript has no such matcher this does nothing.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for matcher in gc.get_referrers(SimplePatternMatcher):
        if isinstance(matcher, SimplePatternMatcher):
            for name in ("_graph", "_current_node", "_match", "_tracer"):
                if name in vars(matcher):
                    setattr(matcher, name, None)


def _export_onnx(
    module, path: Path, exporter: str, opset: int, example: tuple, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> None:
    """Export ``module`` to ``path``, its weights in ``<path>.data`` when over ``external_data_threshold``."""
    import logging

    import torch

    # The exporter logs a warning per missing optional op library (torchvision); not our concern.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    axes = {"batch": 0, "seq": 1}
    dynamic_axes = {name: dict((v, k) for k, v in axes.items()) for name in [*INPUT_NAMES, OUTPUT_NAME]}
    dynamo = exporter == "dynamo"
    # The dynamo exporter writes external data unless told not to (and on its own above 1.5 GiB), and
    # narrates every stage on stdout; keep the CLI's output readable. Fused layers call sftool's
    # contrib ops (dynamo only).
    extra = {}
    if dynamo:
        from sftool.exporters.contrib_ops import TRANSLATIONS

        external = wants_external(module_bytes(module), external_data_threshold)
        extra = {"external_data": external, "custom_translation_table": TRANSLATIONS}
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
    if dynamo:
        _release_matched_graphs()
    else:
        # The torchscript exporter writes one file per tensor past 2 GiB and none below: one data file or none.
        place_weights(path, external_data_threshold)


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


def activation_abs_max(reference: np.ndarray, mask: np.ndarray) -> float:
    """Largest |activation| of ``reference`` [B, T, H] over real (non-padding) positions."""
    return float(np.abs(reference[mask.astype(bool)]).max())


@dataclass
class Fp32Files:
    """The fp32 model of an export: the standard-ONNX ``device.onnx`` and, where onnxruntime has a
    faster form of it, ``optimized`` (fused layers, saved graph optimizations)."""

    optimized: str | None
    portable_method: str
    optimized_method: str
    opset: int

    @property
    def method(self) -> str:
        """How the files were made, both named where there are two (a Variant's ``method``)."""
        if self.optimized is None:
            return self.portable_method
        return f"{self.portable_method}; optimized: {self.optimized_method}"


def write_fp32_files(device_part, staging: Path, opts: ExportOptions, max_seq_len: int, example: tuple, log) -> Fp32Files:
    """Write ``device.onnx`` (the plain part, standard ONNX, checked) and ``device.ort.onnx`` (the
    family's fused layers where it has them, saved as optimized by onnxruntime) into ``staging``."""
    import onnx
    import torch
    from sftool.exporters.portable import require_standard_onnx
    from sftool.exporters.quantize import ort_optimize

    inputs = tuple(map(torch.from_numpy, example))
    portable = staging / DEVICE_ONNX
    threshold = opts.external_data_threshold
    _export_onnx(device_part, portable, opts.exporter, opts.opset, inputs, threshold)
    require_standard_onnx(portable)
    proto = onnx.load(str(portable), load_external_data=False)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opts.opset)
    del proto
    portable_method = f"torch.onnx/{opts.exporter}"

    # Fused layers (onnxruntime contrib kernels) exist only for the dynamo exporter.
    fused = device_part.fused_for_export(max_seq_len) if opts.exporter == "dynamo" else device_part
    if not fused.fused and opts.graph_optimization == "none":
        return Fp32Files(None, portable_method, "", opset)  # onnxruntime would get the same file
    source = portable
    if fused.fused:
        source = staging / f".{OPTIMIZED_ONNX}.plain"
        log(f"exporting the fused layers for onnxruntime ({OPTIMIZED_ONNX})")
        _export_onnx(fused, source, opts.exporter, opts.opset, inputs, threshold)
    is_fused = fused.fused
    del fused  # a copy of the part's weights: gigabytes at full size
    optimized = staging / OPTIMIZED_ONNX
    if opts.graph_optimization == "none":
        move_model(source, optimized)
    else:
        log(f"saving the graph optimized by onnxruntime ({opts.graph_optimization}, portable to ARM64)")
        ort_optimize(source, optimized, opts.graph_optimization, threshold)
        if source != portable:
            remove_model(source)
    method = portable_method + (" + fused layers" if is_fused else "")
    method += "" if opts.graph_optimization == "none" else f" + ort.{opts.graph_optimization}"
    return Fp32Files(OPTIMIZED_ONNX, portable_method, method, opset)


def shape_parity(path: Path, device_part, inputs: list[tuple[np.ndarray, np.ndarray]], settings=None) -> dict[str, dict[str, float]]:
    """``compare_outputs`` of the file at ``path`` (onnxruntime, ``settings``) and PyTorch, per batch shape."""
    from sftool.exporters.quantize import torch_reference
    from sftool.runtime.onnx_model import open_session

    session = open_session(path, settings)
    parity = {}
    for ids, mask in inputs:
        got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
        parity[f"{ids.shape[0]}x{ids.shape[1]}"] = compare_outputs(torch_reference(device_part, (ids, mask)), got, mask)
    return parity


def check_fp32_parity(parities: dict[str, dict[str, dict[str, float]]]) -> float:
    """Raise SftoolError if any file's parity exceeds FP32_PARITY_TOLERANCE x max |activation|;
    return the worst max abs diff. ``parities``: file name -> ``shape_parity``."""
    for name, parity in parities.items():
        worst = max(p["max_abs_diff"] for p in parity.values())
        scale = max(1.0, max(p["ref_max_abs"] for p in parity.values()))
        if worst > FP32_PARITY_TOLERANCE * scale:
            raise SftoolError(
                f"ONNX export {name} differs from PyTorch by {worst:.2e} (> {FP32_PARITY_TOLERANCE} x max |activation| "
                f"{scale:.3g}); not writing it"
            )
    return max(p["max_abs_diff"] for parity in parities.values() for p in parity.values())


def export_device(opts: ExportOptions, log: Callable[[str], None] = print) -> Manifest:
    """Export the device part of ``opts.source`` at ``opts.split`` into ``opts.out``.

    ``device.onnx`` is standard ONNX (any ONNX runtime loads it); the faster onnxruntime form of the
    same model and the int8 models are separate files, all listed in the manifest's variants.
    Everything is written into a temporary folder beside ``out`` and moved into place at the end,
    so a failed export never leaves a half-written artifacts folder behind.
    """
    import torch
    from sftool.exporters.families import adapter_for
    from sftool.exporters.int8_prep import int8_rewrite_note, prepare_for_int8
    from sftool.exporters.model_source import load_model, load_tokenizer, pad_token_id
    from sftool.exporters.partition import DevicePart, check_split, weights_fingerprint
    from sftool.exporters.quantize import (
        calibration_batch,
        ort_parity,
        quantize_variants,
        resolve_targets,
        torch_reference,
    )
    from sftool.runtime.onnx_model import SessionSettings

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
    config = model.config
    adapter = adapter_for(config.model_type)
    num_layers = adapter.num_layers(config)
    check_split(opts.split, num_layers)
    tokenizer = load_tokenizer(opts.source)
    pad_id = pad_token_id(tokenizer)
    max_seq_len = min(opts.max_seq_len, adapter.max_positions(config))
    device_part = DevicePart(adapter, adapter.backbone(model), opts.split).eval()
    # The server's blocks are not needed from here on: free them (gigabytes for a 3B model).
    del model
    gc.collect()
    vocab = int(config.vocab_size)
    # The standard file is checked as a runtime without onnxruntime's rewrites would run it.
    plain_settings = SessionSettings(optimization="disable")

    threshold = opts.external_data_threshold
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        log(f"exporting {adapter.name} blocks 0..{opts.split - 1} of {num_layers} to ONNX ({opts.exporter})")
        example = parity_inputs(vocab, [(2, 8)], opts.seed, pad_id)[0]
        fp32 = write_fp32_files(device_part, staging, opts, max_seq_len, example, log)

        log("checking the saved models with onnxruntime against PyTorch at two shapes")
        inputs = parity_inputs(vocab, [(2, 7), (3, min(33, max_seq_len))], opts.seed + 1, pad_id)
        parities = {DEVICE_ONNX: shape_parity(staging / DEVICE_ONNX, device_part, inputs, plain_settings)}
        if fp32.optimized:
            parities[fp32.optimized] = shape_parity(staging / fp32.optimized, device_part, inputs)  # as a device loads it
        log(f"parity ok: max abs diff {check_fp32_parity(parities):.2e}")
        decoder = None
        if opts.with_decoder:
            from sftool.exporters.decoder_export import write_decoder

            prompt = parity_inputs(vocab, [(2, min(7, max_seq_len))], opts.seed + 2, pad_id)[0][0]
            decoder = write_decoder(device_part, staging, opts.opset, vocab, prompt, FP32_PARITY_TOLERANCE, log)

        tokenizer.save_pretrained(str(staging))
        # Every file's parity is also measured on real text, the same batch for all.
        calibration = calibration_batch(staging, tokenizer, max_seq_len, pad_id)
        reference = torch_reference(device_part, calibration)
        variants = [
            Variant(
                DEVICE_ONNX, "fp32", "any", fp32.method, ort_parity(staging / DEVICE_ONNX, calibration, reference, plain_settings),
                runtime="onnx", optimized_file=fp32.optimized,
                optimized_parity=ort_parity(staging / fp32.optimized, calibration, reference) if fp32.optimized else {},
            )
        ]
        fingerprint = weights_fingerprint(device_part)
        if targets:
            note = int8_rewrite_note(device_part, opts.int8_smooth_alpha)
            log(f"rewriting the device part for int8 activations ({note}) and exporting it")
            fuse = opts.exporter == "dynamo"
            prepared = prepare_for_int8(
                device_part, calibration, opts.int8_smooth_alpha,
                fuse_max_seq_len=max_seq_len if fuse else None,
            )
            int8_source = staging / f".{DEVICE_ONNX}.int8-source"
            _export_onnx(prepared, int8_source, opts.exporter, opts.opset, tuple(map(torch.from_numpy, example)), threshold)
            # Only ONNX files are needed from here on: free the PyTorch weights before onnxruntime's
            # quantizer makes its copies of the model (about 4x its size at the peak).
            del prepared, device_part
            gc.collect()
            variants += quantize_variants(
                staging, targets, calibration, reference, log,
                source_model=int8_source, recipe_note=note, graph_optimization=opts.graph_optimization,
                external_data_threshold=threshold,
            )
            remove_model(int8_source)

        files = {
            str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        parity = {
            "fp32_vs_torch": parities[DEVICE_ONNX],
            "calibration": {"texts": int(calibration[0].shape[0]), "tokens": int(calibration[1].sum())},
        }
        if fp32.optimized:
            parity["fp32_optimized_vs_torch"] = parities[fp32.optimized]
        manifest = Manifest(
            family=adapter.name,
            source=str(opts.source),
            split=opts.split,
            num_layers=num_layers,
            hidden_size=adapter.hidden_size(config),
            max_seq_len=max_seq_len,
            max_batch=opts.max_batch,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
            variants=variants,
            files=files,
            weights_fingerprint=fingerprint,
            opset=fp32.opset,
            inputs=[
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
            ],
            outputs=[{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", "seq", adapter.hidden_size(config)]}],
            parity=parity,
            activation_abs_max=activation_abs_max(reference, calibration[1]),
            created_by=f"sftool {__version__}",
            decoder=decoder,
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

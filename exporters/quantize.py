"""int8 variants of the device model, one per CPU target, each checked against fp32 PyTorch on real text.

Recipe (measured on SmolLM2-135M split 6 and a GPT-2-small-shaped model; numbers in docs/device.md):

- The device part is first rewritten for int8 activations (``exporters/int8_prep.py``): SmoothQuant
  scales where the family allows (outlier channels move into the weights) and per-token activation
  scales around the MLP output projection (where the massive-activation tokens arrive). Both are
  exact in fp32; the rewritten part (with the family's fused export layers, as for fp32) is exported
  once more and that graph is quantized.
- ``onnxruntime.quantization.quantize_dynamic``: weights int8 per output channel (symmetric),
  activations quantized per tensor at run time (per token, in effect, where the rewrite put scales), only
  MatMul/Gemm with a constant weight (the activation x activation MatMuls of attention stay fp32)
  plus the embedding table (Gather). It was as fast as optimum's ``AutoQuantizationConfig`` recipes
  and at least as accurate, and needs onnxruntime only. (``MatMulNBits`` 8-bit, the most accurate,
  ran at fp32 speed on x86.)
- Per target: ``arm64`` and ``avx512_vnni`` use full-range s8 weights (NEON sdot and VNNI accumulate in
  int32); ``avx2`` uses 7-bit weights (``reduce_range``), because AVX2's ``vpmaddubsw`` adds u8 x s8 pairs
  in int16 and saturates with full-range weights.
- Every file is saved already graph-optimized at ``ORT_ENABLE_EXTENDED`` (portable across CPUs:
  contrib-op fusions such as ``DynamicQuantizeMatMul``, no hardware-specific layouts), like the fp32
  model's optimized file. The int8 files are therefore for onnxruntime only (``Variant.runtime``);
  the standard-ONNX model of an export is its fp32 ``device.onnx``.

Each variant's parity (max abs diff, mean and worst-token cosine vs the fp32 PyTorch device part) is
measured on a fixed batch of English sentences tokenized like a device does; a variant below
``MIN_MEAN_COSINE`` is rejected and the export fails.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sftool.errors import SftoolError
from sftool.exporters.external_data import (
    EXTERNAL_DATA_THRESHOLD,
    copy_model,
    data_file,
    data_locations,
    make_inline,
    model_bytes,
    move_model,
    ort_external_options,
    remove_model,
    wants_external,
)
from sftool.runtime.manifest import Variant

INT8_TARGETS = ("arm64", "avx512_vnni", "avx2")
#: An int8 variant whose mean per-token cosine to fp32 PyTorch (on CALIBRATION_TEXTS) is below this is
#: rejected. Measured on SmolLM2 split 6: 0.998 with the recipe above; 0.967 with plain per-tensor int8
#: (whose zero-shot SST-2 answers agree with fp32 on only 72-82% of rows).
MIN_MEAN_COSINE = 0.99
METHOD = "ort.quantize_dynamic"
#: SmoothQuant's migration strength (int8_prep): 0.5 balances activation and weight ranges; best of
#: 0.3-0.85 on SmolLM2 with per-token scales.
SMOOTH_ALPHA = 0.5

#: Real English text for the parity check (bundled: an export must not need the network).
CALIBRATION_TEXTS = (
    "The film opens slowly, but by the second act it had me completely hooked.",
    "I would not recommend this restaurant; the soup was cold and the service was rude.",
    "Please remember to water the plants on the balcony while I am away next week.",
    "The committee will publish its final report on the new railway line in March.",
    "She smiled, picked up the old violin, and played a tune nobody had heard in years.",
    "Heavy rain is expected across the northern valleys tonight, with strong winds near the coast.",
    "Add two cups of flour, a pinch of salt and the melted butter, then stir until smooth.",
    "A dull, predictable plot.",
    "What time does the last train to the airport leave on Sundays?",
    "Researchers found that children who read for pleasure every day scored higher in vocabulary tests.",
    "Thanks!",
    "It is a truth universally acknowledged that a single man in possession of a good fortune must be "
    "in want of a wife.",
)


@dataclass(frozen=True)
class Recipe:
    """How the int8 model for one CPU target is made."""

    reduce_range: bool
    why: str = field(compare=False)  # two targets with the same settings share the same bytes


RECIPES: dict[str, Recipe] = {
    "arm64": Recipe(False, "s8 weights, full range: NEON sdot/udot accumulate in int32"),
    "avx512_vnni": Recipe(False, "s8 weights, full range: VNNI vpdpbusd accumulates in int32"),
    "avx2": Recipe(True, "7-bit s8 weights: AVX2 vpmaddubsw sums u8 x s8 pairs in int16 and would saturate"),
}


def resolve_targets(targets: Sequence[str]) -> list[str]:
    """Validate ``--int8`` names: ``auto`` (or ``all``) means every target, ``none`` (or nothing) none."""
    names = [t.strip().lower() for t in targets if t and t.strip()]
    if not names or names == ["none"]:
        return []
    if "auto" in names or "all" in names:
        return list(INT8_TARGETS)
    unknown = [n for n in names if n not in INT8_TARGETS]
    if unknown:
        raise SftoolError(
            f"unknown --int8 target(s) {', '.join(unknown)}: use auto, none, or a comma list of {', '.join(INT8_TARGETS)}"
        )
    return list(dict.fromkeys(names))


def int8_file(target: str) -> str:
    return f"device.int8.{target}.onnx"


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer warns on the root logger (e.g. "consider pre-processing"); keep the CLI clean."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def ort_optimize(src: Path, dst: Path, level: str = "extended", external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """Save ``src`` as optimized by onnxruntime at a portable level (``basic`` or ``extended``); its
    weights go to ``<dst>.data`` where ``src`` (with its data) is over ``external_data_threshold`` bytes.

    ``all`` is refused: its layout transforms are chosen for the exporting machine's CPU (e.g. NCHWc
    blocks for AVX-512) and the file would not be the same model on an ARM board.
    """
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    if level not in levels:
        raise SftoolError(f"graph optimization level must be one of {', '.join(levels)} (portable to ARM64), not {level!r}")
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".opt.tmp")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]
    options.optimized_model_filepath = str(tmp)
    data_file(dst).unlink(missing_ok=True)
    locations = data_locations(src)
    external = wants_external(model_bytes(src, locations), external_data_threshold)
    # A source with external data is saved with external data too, whatever its size: onnxruntime
    # would otherwise save references into the source's data file, which is deleted after this.
    if external or locations:
        # Named for the final file: the saved graph refers to its data file by name.
        ort_external_options(options, dst)
    try:
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        if not external and data_file(dst).exists():
            make_inline(tmp)  # e.g. an int8 model quantized from a >2 GB source: ~4x smaller
    except Exception as exc:  # ORT raises its own exception types
        tmp.unlink(missing_ok=True)
        data_file(dst).unlink(missing_ok=True)
        raise SftoolError(f"onnxruntime could not optimize {src.name}: {exc}") from None
    from sftool.exporters.contrib_ops import drop_saved_defaults

    drop_saved_defaults(tmp)
    tmp.replace(dst)


def calibration_batch(staging: Path, tokenizer, max_seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """CALIBRATION_TEXTS as (input_ids, attention_mask), right-padded, tokenized exactly as a device does
    (``tokenizers`` with the exported ``tokenizer.json``)."""
    from sftool.runtime.local_data import TextEncoder

    path = Path(staging) / "tokenizer.json"
    with tempfile.TemporaryDirectory() as tmp:
        if not path.is_file():  # not saved yet: write the fast tokenizer's backend
            path = Path(tmp) / "tokenizer.json"
            tokenizer.backend_tokenizer.save(str(path))
        encoder = TextEncoder(path, max_seq_len, pad_id)
        return encoder.encode(list(CALIBRATION_TEXTS))


def torch_reference(device_part, batch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """fp32 PyTorch hidden states of the device part on ``batch``."""
    import torch

    ids, mask = batch
    with torch.no_grad():
        return device_part(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def ort_parity(
    model_path: Path, batch: tuple[np.ndarray, np.ndarray], reference: np.ndarray, settings=None
) -> dict[str, float]:
    """Run the saved file as a device loads it (or with ``settings``, a ``SessionSettings``) and
    compare with ``reference`` on real tokens."""
    from sftool.exporters.onnx_export import OUTPUT_NAME, compare_outputs
    from sftool.runtime.onnx_model import open_session

    ids, mask = batch
    got = open_session(model_path, settings).run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
    return compare_outputs(reference, got, mask)


def quantize_file(
    source_model: Path, out: Path, recipe: Recipe, graph_optimization: str, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
) -> None:
    """Quantize one fp32 ONNX file with ``recipe`` and save it optimized at ``graph_optimization``: how
    every int8 variant is made (and the int8 GEMM probe of ``sftool bench device``). ``out`` keeps its
    weights in ``<out>.data`` where it is larger than ``external_data_threshold`` bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.with_name(f".{out.name}.plain")
    try:
        with _quiet():
            quantize_dynamic(
                str(source_model),
                str(tmp),
                per_channel=True,
                reduce_range=recipe.reduce_range,
                weight_type=QuantType.QInt8,
                # The int8 model is ~4x smaller than its source: external data only where the source
                # needs it, and ort_optimize decides again for the final file.
                use_external_data_format=wants_external(model_bytes(source_model), external_data_threshold),
            )
        if graph_optimization == "none":
            move_model(tmp, out)
        else:
            ort_optimize(tmp, out, graph_optimization, external_data_threshold)
    except SftoolError:
        raise
    except Exception as exc:  # the quantizer raises assorted types on graphs it cannot handle
        raise SftoolError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from None
    finally:
        remove_model(tmp)


def quantize_variants(
    staging: Path,
    targets: Sequence[str],
    batch: tuple[np.ndarray, np.ndarray],
    reference: np.ndarray,
    log: Callable[[str], None] = print,
    *,
    source_model: Path,
    recipe_note: str = "",
    graph_optimization: str = "extended",
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Variant]:
    """Write ``device.int8.<target>.onnx`` into ``staging`` for each (resolved) target; return their Variants.

    ``source_model`` is the fp32 ONNX graph to quantize, as exported (before graph optimization:
    quantizing the plain graph and optimizing afterwards fuses the int8 ops), normally the export of
    ``int8_prep.prepare_for_int8(device_part)``; ``recipe_note`` says how it was prepared (recorded in
    each variant's method). Parity is measured on ``batch`` (the calibration sentences) against
    ``reference``, the fp32 PyTorch device part's output. Raises SftoolError if a variant's mean
    cosine is below MIN_MEAN_COSINE. A file over ``external_data_threshold`` bytes keeps its weights
    in ``<file>.data``.
    """
    from sftool.exporters.portable import file_runtime

    if not targets:
        return []
    staging = Path(staging)
    log(
        f"int8 ({METHOD}, per-channel s8 weights) for {', '.join(targets)}; parity on {len(CALIBRATION_TEXTS)} "
        f"English sentences ({int(batch[1].sum())} tokens)"
    )
    variants = []
    done: dict[Recipe, tuple[Path, dict[str, float]]] = {}
    for target in targets:
        recipe = RECIPES[target]
        out = staging / int8_file(target)
        if recipe in done:  # same recipe, same bytes: copy instead of quantizing again
            first, parity = done[recipe]
            copy_model(first, out)
        else:
            quantize_file(Path(source_model), out, recipe, graph_optimization, external_data_threshold)
            parity = ort_parity(out, batch, reference)
            log(
                f"int8/{target}: {model_bytes(out) / 1e6:.1f} MB, mean cosine {parity['mean_cosine']:.5f}, "
                f"worst token {parity['min_cosine']:.5f}, max abs diff {parity['max_abs_diff']:.3g}"
            )
            done[recipe] = (out, parity)
        if parity["mean_cosine"] < MIN_MEAN_COSINE:
            raise SftoolError(
                f"the int8 model for {target} is too far from fp32 (mean cosine {parity['mean_cosine']:.4f} < "
                f"{MIN_MEAN_COSINE}); export without it (--int8 none) or use fp32 devices"
            )
        note = f"; {recipe_note}" if recipe_note else ""
        method = f"{METHOD}(per_channel, s8{', reduce_range' if recipe.reduce_range else ''}{note})"
        # Saved optimized (or fused), the file holds onnxruntime's contrib ops: runtime says so.
        variants.append(Variant(out.name, "int8", target, method, dict(parity), runtime=file_runtime(out)))
    return variants

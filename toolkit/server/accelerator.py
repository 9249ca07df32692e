"""Where the server trains and in which precision: ``--accelerator`` and ``--precision``.

The model goes to the chosen device once; every batch follows the model (``model.device``), so
nothing else needs to know. bf16 runs the forward and the loss under ``torch.autocast``: matrix
products in bfloat16, the LoRA and head master weights, their gradients and AdamW's moments stay
float32 (autocast never changes a parameter's dtype), so no loss scaling is needed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from sftool.errors import SftoolError

ACCELERATORS = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(accelerator: str = "auto") -> torch.device:
    """``auto``: CUDA when a GPU is visible, else the CPU. ``cuda`` without one is a user error."""
    if accelerator not in ACCELERATORS:
        raise SftoolError(f"--accelerator must be one of {', '.join(ACCELERATORS)}, not {accelerator!r}")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise SftoolError("--accelerator cuda: no CUDA device is visible to torch (use auto or cpu)")
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it, fp32 elsewhere (a CPU's bf16 speed depends on AMX/AVX-512
    BF16, so it is asked for, not assumed). ``bf16`` on a GPU without it is a user error."""
    if precision not in PRECISIONS:
        raise SftoolError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SftoolError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    return precision


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """The forward's precision context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def host_to_device(array, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A received numpy array as a ``dtype`` tensor on ``device``: on a GPU through pinned memory
    with a non-blocking copy (the receiver's next batch decodes while this one travels)."""
    tensor = torch.from_numpy(array).to(dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


#: glibc's mallopt parameters (malloc.h): a freed block above the mmap threshold goes back to the
#: system at once; a trim threshold of 0 returns the heap's free top as well.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks of at least this many bytes are mmapped (activations are megabytes; small tensors stay on the heap).
MMAP_THRESHOLD = 64 * 1024


def return_freed_memory() -> bool:
    """Have glibc hand freed activation memory back to the system instead of keeping it for reuse.

    With its default, dynamic threshold, glibc's heap keeps what a step freed, and a server's resident
    memory grows to the largest step plus the fragments around it (SmolLM2 split 6 at 16 x 256 tokens
    with recomputed blocks: 3.7 GB resident for 0.8 GB of live tensors; 1.5 GB with this). Applied
    for ``--recompute``, whose point is memory. False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 0))


def describe(device: torch.device, precision: str) -> str:
    """One line for the log: which device, which precision."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{device} ({name}), {precision}"


def rng_state() -> dict:
    """Every random state a step may draw from: the CPU's, and each visible GPU's."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``; a checkpoint from a GPU host resumes on a CPU one (and back) with
    the CPU state alone."""
    torch.set_rng_state(state["torch_rng"])
    cuda = state.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)

"""Our CPU kernels for bf16 decoding, compiled on the machine that runs them: the AMX projections
(amx_rows.c) and the small operations of a layer (layer_ops.c, used by layer_ops.py).

Compiled once with the system's C compiler into the user's cache folder (named by the source's hash
and flags, so an edit recompiles), loaded with ctypes (which releases the GIL while it runs). Where the
CPU lacks AMX, Linux refuses it, no compiler is found or compiling fails, `library()` is None and
torch's kernels are used: the server never depends on it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("qwenserve.engine")

SOURCES = [Path(__file__).with_name("amx_rows.c"), Path(__file__).with_name("layer_ops.c")]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared",
         "-fPIC"]
TILE_OUTPUTS, TILE_INPUTS = 16, 32  # a packed weight's shape must be a multiple of these


def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.cache
def library():
    """The loaded kernel library, or None where it cannot run here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cpu_has_amx() or compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_compiled(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("the AMX kernel could not be built (%s); torch's kernels are used", exc)
        return None
    if not lib.amx_init():
        log.warning("Linux refused AMX to this process; torch's kernels are used")
        return None
    pointers = [ctypes.c_void_p] * 3
    lib.amx_pack.argtypes = pointers[:2] + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.amx_rows.argtypes = pointers + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.amx_rows_int8.argtypes = pointers + [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.amx_rows_int8.restype = ctypes.c_int
    lib.amx_gather.argtypes = pointers + [ctypes.c_int64] * 2
    _declare_layer_ops(lib)
    return lib


def _declare_layer_ops(lib) -> None:
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.rms_norm.argtypes = [pointer] * 3 + [i64] * 2 + [f32]
    lib.add_rms_norm.argtypes = [pointer] * 5 + [i64] * 2 + [f32]
    lib.silu_mul.argtypes = [pointer] * 2 + [i64] * 2
    lib.qk_rope_store.argtypes = [pointer, i64] + [i32] * 3 + [pointer] * 2 + [f32] + [pointer] * 7 + [i64]
    lib.decode_attention.argtypes = [pointer] * 5 + [i64] + [i32] * 3 + [i64, f32, pointer]
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_layers.argtypes = ([pointer, i32] + [pointer] * 3 + [i64, pointer, f32, f32] + [pointer] * 5
                                  + [i64, f32, i32])
    lib.decode_layers.restype = ctypes.c_int


def _compiled(compiler: str) -> Path:
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES) + " ".join(FLAGS).encode())
    digest = digest.hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwenserve"
    target = folder / f"amx_rows-{digest}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # several servers may start at once: each builds its own file and renames it into place
        handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(handle)
        try:
            subprocess.run([compiler, *FLAGS, "-o", partial, *map(str, SOURCES)], check=True, capture_output=True,
                           timeout=120)
            os.replace(partial, target)
            for stale in folder.glob("amx_rows-*.so"):  # builds of older sources
                if stale != target:
                    stale.unlink(missing_ok=True)
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


def packable(weight: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel can take this weight, in its dtype or the one it will be quantized to."""
    out_features, in_features = weight.shape
    dtype = dtype or weight.dtype
    return (library() is not None and weight.device.type == "cpu" and dtype in (torch.bfloat16, torch.int8)
            and out_features % TILE_OUTPUTS == 0 and in_features % TILE_INPUTS == 0)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (bf16 or int8) -> [N / 16, K / 32, 16, 32]: AMX's weight tiles, in reading order."""
    out_features, in_features = weight.shape
    weight = weight.detach().contiguous()
    packed = torch.empty(out_features // TILE_OUTPUTS, in_features // TILE_INPUTS, 16, 32, dtype=weight.dtype)
    library().amx_pack(weight.data_ptr(), packed.data_ptr(), out_features, in_features, weight.element_size())
    return packed


def matmul(packed: torch.Tensor, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16) @ the packed weight's transpose -> [M, N] bf16. int8 weights come with their
    per-output scales (fp32)."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], packed.shape[0] * TILE_OUTPUTS, dtype=torch.bfloat16)
    shape = (x.shape[0], out.shape[1], x.shape[1], torch.get_num_threads())
    if packed.dtype == torch.int8:
        if library().amx_rows_int8(packed.data_ptr(), scales.data_ptr(), x.data_ptr(), out.data_ptr(), *shape):
            raise MemoryError("the int8 kernel could not allocate its widening buffer")
    else:
        library().amx_rows(packed.data_ptr(), x.data_ptr(), out.data_ptr(), *shape)
    return out


def gather(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the packed weight, unpacked: [len(ids), K] bf16."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < packed.shape[0] * TILE_OUTPUTS:
        raise IndexError("token id out of the vocabulary")  # C would read out of bounds
    out = torch.empty(ids.numel(), packed.shape[1] * TILE_INPUTS, dtype=torch.bfloat16)
    library().amx_gather(packed.data_ptr(), ids.data_ptr(), out.data_ptr(), ids.numel(), out.shape[1])
    return out

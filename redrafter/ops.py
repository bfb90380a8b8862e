"""The native op library (`custom_ops/`, built by `make ops`): where it is, how to register it
with ONNX Runtime, and a ctypes view of its C ABI for tests and benchmarks.

The op identity (domain, names, versions) is `redrafter.bundle.names`, which mirrors
`custom_ops/tree_attention/redrafter_ops.h` (tests/test_native_ops.py checks that they agree).
Semantics and shapes of both ops: `custom_ops/tree_attention/tree_attention.h` and
docs/design.md §4.

Dimensions: B batch, Hq query heads, Hkv key/value heads, N new tokens, D head dim, S cache
capacity, K commit slots, Z flattened leading cache dims.

Importing this module loads nothing; the library is opened only by the functions that need it.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from pathlib import Path

import numpy as np

from redrafter.errors import RuntimeUnavailableError

LIBRARY_ENV = "REDRAFTER_OPS_LIBRARY"
LIBRARY_NAME = "libredrafter_ops.so"

# Element type codes of the C ABI: ONNX TensorProto.DataType numbers.
_DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}


def library_path() -> Path | None:
    """The native library to use: `$REDRAFTER_OPS_LIBRARY` when set, else
    `<repo>/build/ops/libredrafter_ops.so` next to the package when built, else None."""
    env = os.environ.get(LIBRARY_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise RuntimeUnavailableError(
                f"{LIBRARY_ENV}={env} is not a file; unset it or build the library with `make ops`"
            )
        return path
    path = Path(__file__).resolve().parent.parent / "build" / "ops" / LIBRARY_NAME
    return path if path.is_file() else None


def register(session_options, *, required: bool = False) -> bool:
    """Registers the native kernels with an `onnxruntime.SessionOptions`.

    Returns True when registered. Without a library (or when this onnxruntime refuses it) it
    returns False, so the session runs the models' portable function bodies; with
    `required=True` it raises `RuntimeUnavailableError` instead.
    """
    path = library_path()
    if path is None:
        if required:
            raise RuntimeUnavailableError(
                f"native op library not found (build/ops/{LIBRARY_NAME}); run `make ops` "
                f"or set {LIBRARY_ENV}"
            )
        return False
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        message = f"onnxruntime refused the native op library {path}: {e}"
        if required:
            raise RuntimeUnavailableError(message) from e
        warnings.warn(message + "; running the portable op bodies", stacklevel=2)
        return False
    return True


def has_cuda_kernels(path: Path | None = None) -> bool:
    """Whether the library (default: `library_path()`) was built with its CUDA kernels."""
    path = path or library_path()
    return path is not None and bool(load_c_api(path).rd_has_cuda_kernels())


def _probe(path: Path | None, function: str, absent: int) -> int:
    """The int that the library at `path` (default: `library_path()`) returns from the C
    function `function`, or `absent` without a library or in a build made before it existed."""
    path = path or library_path()
    probe = None if path is None else getattr(ctypes.CDLL(str(path)), function, None)
    if probe is None:
        return absent
    probe.restype = ctypes.c_int
    return int(probe())


def matmul_int4_max_outputs(path: Path | None = None) -> int:
    """The most outputs a `redrafter::MatMulInt4` node may have in the library at `path`
    (default: `library_path()`): its `split` attribute's limit, or 1 for a build made before the
    attribute existed (or no library)."""
    return _probe(path, "rd_matmul_int4_max_outputs", 1)


def matmul_int4_max_inputs(path: Path | None = None) -> int:
    """The most inputs a `redrafter::MatMulInt4` node may have in the library at `path`
    (default: `library_path()`): 8 where it takes `residual` and `gate` (a residual Add and a
    SwiGLU Mul folded in), 6 (MatMulNBits' inputs) for a build made before them, or no
    library."""
    return _probe(path, "rd_matmul_int4_max_inputs", 6)


def load_c_api(path: Path | None = None) -> ctypes.CDLL:
    """The library's C ABI (redrafter_ops.h) with argument types declared."""
    path = path or library_path()
    if path is None:
        raise RuntimeUnavailableError(
            f"native op library not found; run `make ops` or set {LIBRARY_ENV}"
        )
    lib = ctypes.CDLL(str(path))
    i64, ptr, f32, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
    attention = [i32, i64, i64, i64, i64, i64, i64, f32, i64, f32] + [
        ptr
    ] * 10  # scale, window, softcap
    for name, last in [
        ("rd_tree_attention_cpu", i32),
        ("rd_tree_attention_cuda_emulated", i32),
        ("rd_tree_attention_cuda", ptr),
    ]:
        fn = getattr(lib, name)
        fn.argtypes = attention + [last]
        fn.restype = i32
    lib.rd_tree_attention_rotary_cuda.argtypes = attention + [ptr, ptr, ptr]  # cos, sin, stream
    lib.rd_tree_attention_rotary_cuda.restype = i32
    commit = [i32, i64, i64, i64, i64, i64, i64] + [ptr] * 5
    lib.rd_kv_commit_cpu.argtypes = commit
    lib.rd_kv_commit_cuda.argtypes = commit + [ptr]
    for name in ("rd_kv_commit_cpu", "rd_kv_commit_cuda", "rd_has_cuda_kernels"):
        getattr(lib, name).restype = i32
    lib.rd_last_error.restype = ctypes.c_char_p
    return lib


def _ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous, "native kernels take C-contiguous arrays"
    return a.ctypes.data


def tree_attention_host(
    lib: ctypes.CDLL,
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    key_cache: np.ndarray,
    value_cache: np.ndarray,
    past_len: np.ndarray,
    tree_mask: np.ndarray,
    *,
    scale: float = 0.0,
    window: int = 0,
    softcap: float = 0.0,
    key_cache_out: np.ndarray | None = None,
    value_cache_out: np.ndarray | None = None,
    threads: int = 0,
    emulate_cuda_sms: int | None = None,
) -> np.ndarray:
    """TreeAttention on numpy arrays through the C ABI: the CPU kernel, or with
    `emulate_cuda_sms` the host emulation of the CUDA kernel planned for that many SMs.

    query (B, Hq, N, D); key, value (B, Hkv, N, D); key_cache, value_cache (B, Hkv, S, D), all
    float32 or all float16; past_len (B,) int64; tree_mask (B, N, N) bool. The caches are
    written in place unless `*_out` arrays are given. `scale`, `window` and `softcap` are the
    op's attributes (0: 1/sqrt(D), no window, no soft-capping). Returns output (B, Hq, N, D).
    Raises ValueError with the kernel's message on invalid arguments.
    """
    B, Hq, N, D = query.shape
    Hkv, S = key_cache.shape[1], key_cache.shape[2]
    output = np.empty_like(query)
    kc_out = key_cache if key_cache_out is None else key_cache_out
    vc_out = value_cache if value_cache_out is None else value_cache_out
    past_len = np.ascontiguousarray(past_len, dtype=np.int64)
    tree_mask = np.ascontiguousarray(tree_mask, dtype=np.bool_)
    args = [_DTYPE_CODES[query.dtype], B, Hq, Hkv, N, D, S, scale, window, softcap]
    args += [_ptr(a) for a in (query, key, value, key_cache, value_cache, past_len, tree_mask)]
    args += [_ptr(output), _ptr(kc_out), _ptr(vc_out)]
    if emulate_cuda_sms is None:
        rc = lib.rd_tree_attention_cpu(*args, threads)
    else:
        rc = lib.rd_tree_attention_cuda_emulated(*args, emulate_cuda_sms)
    if rc != 0:
        raise ValueError(lib.rd_last_error().decode())
    return output


def kv_commit_host(
    lib: ctypes.CDLL,
    cache: np.ndarray,
    past_len: np.ndarray,
    source: np.ndarray,
    count: np.ndarray,
    *,
    cache_out: np.ndarray | None = None,
) -> np.ndarray:
    """KVCommit on a numpy cache (..., B, Hkv, S, D) through the C ABI; in place unless
    `cache_out` is given. past_len, count (B,) int64; source (B, K) int64. Returns the result."""
    *lead, B, Hkv, S, D = cache.shape
    out = cache if cache_out is None else cache_out
    source = np.ascontiguousarray(source, dtype=np.int64)
    Z = int(np.prod(lead)) if lead else 1
    ints = [np.ascontiguousarray(x, dtype=np.int64) for x in (past_len, source, count)]
    rc = lib.rd_kv_commit_cpu(
        _DTYPE_CODES[cache.dtype],
        Z,
        B,
        Hkv,
        S,
        D,
        source.shape[1],
        _ptr(cache),
        _ptr(out),
        *(_ptr(x) for x in ints),
    )
    if rc != 0:
        raise ValueError(lib.rd_last_error().decode())
    return out

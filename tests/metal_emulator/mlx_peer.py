"""MLX's Metal kernels as the emulator's peer suite: sources, host-side parameters, references.

The kernel sources come from the mlx-metal macOS wheel on PyPI, downloaded at
test time into a cache outside the repository (never committed); the
instantiation files in tests/metal_emulator/mlx/ and the parameter filling
below are jax_mfa's own, written after MLX's host code
(mlx/backend/metal/matmul.cpp and scaled_dot_product_attention.cpp).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest

import jax_mfa.metal_emulator as me

MLX_METAL_VERSION = os.environ.get("JAX_MFA_MLX_METAL_VERSION", "0.32.4")
HERE = pathlib.Path(__file__).resolve().parent
KERNELS_PREFIX = "mlx/include/mlx/backend/metal/kernels/"

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with jax
    BFLOAT16 = None

DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": BFLOAT16}
MANTISSA_BITS = {"float16": 10, "bfloat16": 7}


def _cache_root() -> pathlib.Path:
    root = os.environ.get("JAX_MFA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jax_mfa")
    return pathlib.Path(root)


def mlx_include_dir() -> str:
    """The `mlx/include` directory of the mlx-metal wheel's sources; skips the test when it cannot be had."""
    dest = _cache_root() / f"mlx-metal-{MLX_METAL_VERSION}"
    marker = dest / KERNELS_PREFIX / "steel" / "gemm" / "gemm.h"
    if not marker.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--platform", "macosx_14_0_arm64", f"mlx-metal=={MLX_METAL_VERSION}", "-d", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"cannot download the mlx-metal wheel (MLX's kernel sources): {e}")
            wheels = list(pathlib.Path(tmp).glob("mlx_metal-*.whl"))
            if proc.returncode != 0 or not wheels:
                pytest.skip("cannot download the mlx-metal wheel (MLX's kernel sources; offline?): "
                            + (proc.stderr.strip().splitlines() or ["no wheel"])[-1])
            staging = pathlib.Path(tempfile.mkdtemp(dir=_cache_root()))
            with zipfile.ZipFile(wheels[0]) as z:
                z.extractall(staging, [n for n in z.namelist() if n.startswith(KERNELS_PREFIX)])
            try:
                os.replace(staging, dest)
            except OSError:  # another process won the race
                pass
    return str(dest / "mlx" / "include")


_LIBS: dict[str, me.Library] = {}


def load(name: str) -> me.Library:
    """Compile one of the instantiation files of tests/metal_emulator/mlx/ against MLX's unchanged headers."""
    if name not in _LIBS:
        _LIBS[name] = me.load(str(HERE / "mlx" / name), include_paths=[mlx_include_dir()])
    return _LIBS[name]


# ---------------------------------------------------------------------------
# Random inputs and comparison with float64 references.
def random(rng, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(DTYPES[dtype])


def assert_close(out: np.ndarray, ref: np.ndarray, dtype: str, numpy_f32_error: float | None = None):
    """float32: within a small multiple of NumPy's own float32 error on the same problem (given);
    float16/bfloat16: within one unit of the storage precision of the reference."""
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten or poisoned elements)"
    err = np.abs(out - ref)
    if dtype == "float32":
        tol = 4 * numpy_f32_error + 1e-7 * np.abs(ref).max()
    else:
        mag = np.maximum(np.abs(ref), 2.0 ** -14)
        tol = 2.0 ** (np.floor(np.log2(mag)) - MANTISSA_BITS[dtype])
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.size} elements differ; worst error {err.max():.3g} "
                           f"(tolerance there {np.broadcast_to(tol, err.shape).flat[int(np.argmax(err))]:.3g})")


# ---------------------------------------------------------------------------
# Steel GEMM (following steel_matmul_regular_axpby in MLX's matmul.cpp).
GEMM_PARAMS = np.dtype([("M", "<i4"), ("N", "<i4"), ("K", "<i4"), ("lda", "<i4"), ("ldb", "<i4"), ("ldd", "<i4"),
                        ("tiles_n", "<i4"), ("tiles_m", "<i4"), ("batch_stride_a", "<i8"),
                        ("batch_stride_b", "<i8"), ("batch_stride_d", "<i8"), ("swizzle_log", "<i4"),
                        ("gemm_k_iterations_aligned", "<i4"), ("batch_ndim", "<i4")], align=True)
GEMM_ADDMM_PARAMS = np.dtype([("ldc", "<i4"), ("fdc", "<i4"), ("batch_stride_c", "<i8"), ("alpha", "<f4"),
                              ("beta", "<f4")], align=True)
GEMM_BLOCK = dict(bm=32, bn=32, bk=16, wm=2, wn=2)  # as instantiated in mlx/steel_gemm.metal


def gemm(lib, dtype: str, ta: bool, tb: bool, a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None,
         alpha: float = 1.0, beta: float = 0.0, batch_shape=None, swizzle_log: int = 0, **dispatch):
    """D = alpha * op(A) @ op(B) + beta * C with MLX's steel_gemm_fused kernel.

    a: (batch, M, K), stored transposed ((batch, K, M)) when ta; b likewise with tb.
    batch_shape with a_strides/b_strides in elements (e.g. 0 to broadcast) goes
    through MLX's general batch path (has_batch); otherwise the batch is one
    dimension with contiguous strides. Returns (D, profile or None)."""
    bm, bn, bk, wm, wn = (GEMM_BLOCK[k] for k in ("bm", "bn", "bk", "wm", "wn"))
    batch_a, rows_a, cols_a = a.shape
    batch_b, rows_b, cols_b = b.shape
    M, K = (cols_a, rows_a) if ta else (rows_a, cols_a)
    N = rows_b if tb else cols_b
    strides = dispatch.pop("batch_strides", None)
    if batch_shape is None:
        batch_shape = (max(batch_a, batch_b),)
    batch = int(np.prod(batch_shape))
    d = np.full((batch, M, N), np.nan, DTYPES[dtype])  # poisoned: unwritten elements show
    has_batch = len(batch_shape) > 1
    use_out_source = c is not None and (alpha != 0.0 or beta != 1.0)
    do_axpby = use_out_source and (alpha != 1.0 or beta != 1.0)
    tn, tm = -(-N // bn), -(-M // bm)
    params = np.zeros((), GEMM_PARAMS)
    for k, v in dict(M=M, N=N, K=K, lda=M if ta else K, ldb=K if tb else N, ldd=N, tiles_n=tn, tiles_m=tm,
                     batch_stride_a=a[0].size if batch_a > 1 else 0, batch_stride_b=b[0].size if batch_b > 1 else 0,
                     batch_stride_d=M * N, swizzle_log=swizzle_log, gemm_k_iterations_aligned=K // bk,
                     batch_ndim=len(batch_shape)).items():
        params[k] = v
    tile = 1 << swizzle_log
    grid = (tn * tile, -(-tm // tile), batch)
    buffers = [a, b, None, d, params.tobytes()]
    if use_out_source:
        addmm = np.zeros((), GEMM_ADDMM_PARAMS)
        ldc, fdc = c.shape[-1], 1
        for k, v in dict(ldc=ldc, fdc=fdc, batch_stride_c=c[0].size if c.shape[0] > 1 else 0, alpha=alpha,
                         beta=beta).items():
            addmm[k] = v
        buffers[2] = c
        buffers += [addmm.tobytes()]
    if has_batch:
        a_str, b_str = strides[0], strides[1]
        all_strides = list(a_str) + list(b_str) + (list(strides[2]) if use_out_source else [])
        buffers += [None] * (6 - len(buffers))
        buffers += [np.array(batch_shape, np.int32), np.array(all_strides, np.int64)]
    name = (f"steel_gemm_fused_{'t' if ta else 'n'}{'t' if tb else 'n'}_{dtype}_{dtype}"
            f"_bm{bm}_bn{bn}_bk{bk}_wm{wm}_wn{wn}")
    fcs = dict(has_batch=has_batch, use_out_source=use_out_source, do_axpby=do_axpby, align_M=M % bm == 0,
               align_N=N % bn == 0, align_K=K % bk == 0)
    prof = lib.dispatch(name, grid=grid, threads=(32, wn, wm), buffers=buffers, function_constants=fcs,
                        **dispatch)
    return d, prof


def gemm_reference(ta, tb, a, b, c=None, alpha=1.0, beta=0.0):
    a64 = a.astype(np.float64)
    b64 = b.astype(np.float64)
    a64 = np.swapaxes(a64, -1, -2) if ta else a64
    b64 = np.swapaxes(b64, -1, -2) if tb else b64
    out = alpha * (a64 @ b64)
    f32 = (np.swapaxes(a.astype(np.float32), -1, -2) if ta else a.astype(np.float32)) @ (
        np.swapaxes(b.astype(np.float32), -1, -2) if tb else b.astype(np.float32))
    if c is not None:
        out = out + beta * c.astype(np.float64)
        f32 = np.float32(alpha) * f32 + np.float32(beta) * c.astype(np.float32)
    return out, float(np.abs(f32 - out).max())

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
            _cache_root().mkdir(parents=True, exist_ok=True)
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
    float16/bfloat16: within one unit of the storage precision at the output's largest magnitude
    (normwise: an element near 0 gets the same absolute tolerance as the largest one)."""
    out = np.asarray(out).astype(np.float64)
    assert np.isfinite(ref).all(), "the reference is not finite (a row without any allowed key?)"
    assert np.isfinite(out).all(), "non-finite output (unwritten or poisoned elements)"
    err = np.abs(out - ref)
    if dtype == "float32":
        tol = 4 * numpy_f32_error + 1e-7 * np.abs(ref).max()
    else:
        tol = 2.0 ** (np.floor(np.log2(max(np.abs(ref).max(), 2.0 ** -14))) - MANTISSA_BITS[dtype])
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


# ---------------------------------------------------------------------------
# Steel attention forward (following sdpa_full_self_attention_metal in MLX's
# scaled_dot_product_attention.cpp) and the vector kernels (sdpa_vector, sdpa_vector_2pass).
ATTN_PARAMS = np.dtype([("B", "<i4"), ("H", "<i4"), ("D", "<i4"), ("qL", "<i4"), ("kL", "<i4"),
                        ("gqa_factor", "<i4"), ("scale", "<f4"), ("NQ", "<i4"), ("NK", "<i4"),
                        ("NQ_aligned", "<i4"), ("NK_aligned", "<i4"), ("qL_rem", "<i4"), ("kL_rem", "<i4"),
                        ("qL_off", "<i4"), ("Q_strides", "<i8", 3), ("K_strides", "<i8", 3),
                        ("V_strides", "<i8", 3), ("O_strides", "<i8", 3)], align=True)
ATTN_MASK_PARAMS = np.dtype([("M_strides", "<i8", 3)])


def _strides(x: np.ndarray) -> list[int]:
    return [s // x.itemsize for s in x.strides[:3]]


def attention(lib, dtype: str, q, k, v, scale: float, causal: bool = False, mask=None, **dispatch):
    """MLX's steel attention forward. q: (B, H, qL, D); k, v: (B, H_kv, kL, D); mask: (B, H, qL, kL) bool
    (True: keep) or of q's dtype (added to the scores). Causal is MLX's (bottom-right aligned)."""
    B, H, qL, D = q.shape
    kL = k.shape[2]
    bq, bk, wm, wn = 32, (32 if D < 128 else 16), 4, 1
    o = np.full(q.shape, np.nan, q.dtype)
    nq, nk = -(-qL // bq), -(-kL // bk)
    params = np.zeros((), ATTN_PARAMS)
    for key, val in dict(B=B, H=H, D=D, qL=qL, kL=kL, gqa_factor=H // k.shape[1], scale=scale, NQ=nq, NK=nk,
                         NQ_aligned=qL // bq, NK_aligned=kL // bk, qL_rem=qL - (qL // bq) * bq,
                         kL_rem=kL - (kL // bk) * bk, qL_off=kL - qL, Q_strides=_strides(q), K_strides=_strides(k),
                         V_strides=_strides(v), O_strides=_strides(o)).items():
        params[key] = val
    buffers = [q, k, v, o, params.tobytes()]
    if mask is not None:
        mp = np.zeros((), ATTN_MASK_PARAMS)
        mp["M_strides"] = _strides(mask)
        buffers += [mp.tobytes(), mask]
    mname = "bool_" if mask is not None and mask.dtype == np.bool_ else dtype
    name = f"steel_attention_{dtype}_bq{bq}_bk{bk}_bd{D}_wm{wm}_wn{wn}_mask{mname}"
    fcs = dict(align_Q=qL % bq == 0, align_K=kL % bk == 0, has_mask=mask is not None, do_causal=causal,
               has_sinks=False, save_lse=False)
    prof = lib.dispatch(name, grid=(nq, H, B), threads=(32, wm, wn), buffers=buffers, function_constants=fcs,
                        **dispatch)
    return o, prof


def _vector_fcs(mask, causal):
    bool_mask = mask is not None and mask.dtype == np.bool_
    return dict(has_mask=mask is not None, query_transposed=False, do_causal=causal, bool_mask=bool_mask,
                float_mask=mask is not None and not bool_mask, has_sinks=False)


def _mask_strides(mask):
    # (kv_seq, q_seq, head) strides in elements, 0 along broadcast dimensions, as MLX passes them.
    st = [s // mask.itemsize for s in mask.strides]
    kv = st[3] if mask.shape[3] > 1 else 0
    qs = st[2] if mask.shape[2] > 1 else 0
    head = st[1] if mask.shape[1] > 1 else (st[0] if mask.shape[0] > 1 else 0)
    return [np.int32(kv), np.int32(qs), np.int32(head)]


def sdpa_vector(lib, dtype: str, q, k, v, scale: float, causal: bool = False, mask=None, **dispatch):
    """MLX's one-pass vector kernel: q (B, H, qL <= 8, D), k/v (B, H_kv, kL, D) contiguous."""
    B, H, qL, D = q.shape
    out = np.full(q.shape, np.nan, q.dtype)
    buffers = [q, k, v, out, np.int32(H // k.shape[1]), np.int32(k.shape[2]), np.uint64(k.strides[1] // k.itemsize),
               np.uint64(D), np.uint64(v.strides[1] // v.itemsize), np.uint64(D), np.float32(scale)]
    if mask is not None:
        buffers += [None, None]
        buffers[11 + (mask.dtype != np.bool_)] = mask
        buffers += _mask_strides(mask)
    prof = lib.dispatch(f"sdpa_vector_{_TYPE_NAME[dtype]}_{D}_{D}", grid=(B * H, qL, 1), threads=(1024, 1, 1),
                        buffers=buffers, function_constants=_vector_fcs(mask, causal), **dispatch)
    return out, prof


def sdpa_vector_2pass(lib, dtype: str, q, k, v, scale: float, blocks: int, causal: bool = False, mask=None,
                      **dispatch):
    """MLX's two-pass vector kernels (keys split over `blocks` threadgroups, then a reduction)."""
    B, H, qL, D = q.shape
    hkv = k.shape[1]
    out = np.full(q.shape, np.nan, q.dtype)
    partials = np.full((B, H, qL, blocks, D), np.nan, q.dtype)
    sums = np.full((B, H, qL, blocks), np.nan, np.float32)
    maxs = np.full((B, H, qL, blocks), np.nan, np.float32)
    buffers = [q, k, v, partials, sums, maxs, None, np.int32(k.shape[2]), np.uint64(k.strides[1] // k.itemsize),
               np.uint64(D), np.uint64(v.strides[1] // v.itemsize), np.uint64(D), np.float32(scale)]
    if mask is not None:
        buffers += [None, None]
        buffers[13 + (mask.dtype != np.bool_)] = mask
        buffers += _mask_strides(mask)
    fcs = dict(_vector_fcs(mask, causal), blocks=blocks)
    t = _TYPE_NAME[dtype]
    p1 = lib.dispatch(f"sdpa_vector_2pass_1_{t}_{D}_{D}", grid=(hkv, B, blocks), threads=(32, H // hkv, qL),
                      buffers=buffers, function_constants=fcs, **dispatch)
    p2 = lib.dispatch(f"sdpa_vector_2pass_2_{t}_{D}", grid=(B * H, qL, 1), threads=(1024, 1, 1),
                      buffers=[partials, sums, maxs, out, np.int32(blocks)], **dispatch)
    return out, (p1, p2)


_TYPE_NAME = {"float32": "float", "float16": "float16_t", "bfloat16": "bfloat16_t"}


def attention_reference(q, k, v, scale, causal=False, mask=None):
    """(float64 softmax(scale * Q K^T (+ mask)) V with GQA; causal and bool masks as in MLX,
    the largest error of the same computation in NumPy float32)."""
    ref = _attention(q, k, v, scale, causal, mask, np.float64)
    return ref, float(np.abs(_attention(q, k, v, scale, causal, mask, np.float32) - ref).max())


def _attention(q, k, v, scale, causal, mask, dt):
    q64, k64, v64 = (x.astype(dt) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k64 = np.repeat(k64, g, axis=1)
    v64 = np.repeat(v64, g, axis=1)
    s = dt(scale) * (q64 @ np.swapaxes(k64, -1, -2))
    qL, kL = s.shape[-2:]
    keep = np.ones(s.shape, bool)
    if causal:
        keep &= np.arange(kL)[None, :] <= np.arange(qL)[:, None] + (kL - qL)
    if mask is not None:
        if mask.dtype == np.bool_:
            keep &= mask
        else:
            s = s + mask.astype(dt)
    s = np.where(keep, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v64

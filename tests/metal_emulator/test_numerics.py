"""Kernels compared with NumPy: math, conversions, SIMD-group functions, barriers, matrices."""

import numpy as np
import pytest

import jax_mfa.metal_emulator as me

ml_dtypes = pytest.importorskip("ml_dtypes")


def _ref_unary(v):
    return np.stack([
        np.exp(v), np.exp2(v), np.log2(np.abs(v) + 1), np.tanh(v), np.sqrt(np.abs(v)),
        1 / np.sqrt(np.abs(v) + 1), v * v + 1, np.clip(np.maximum(v, -1), -2, 0.5),
    ], axis=1).reshape(-1)


@pytest.mark.parametrize("dtype,name,rtol", [
    (np.float32, "float", 2e-6),
    (np.float16, "half", 2e-3),
    ("bfloat16", "bfloat", 1.6e-2),
])
def test_unary_math(kernel_lib, dtype, name, rtol):
    lib = kernel_lib("elementwise.metal")
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    n = 100
    x = np.linspace(-3, 3, n).astype(dt)
    out = np.zeros(8 * n, dt)
    lib.dispatch(f"unary_math_{name}", grid=(4,), threads=(32,), buffers=[x, out, n])
    ref = _ref_unary(x.astype(np.float64))
    np.testing.assert_allclose(out.astype(np.float64), ref, rtol=rtol, atol=rtol)


def test_vector_ops(kernel_lib):
    lib = kernel_lib("elementwise.metal")
    n = 50
    a = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    a[3, 1] = np.nan
    a[7, 2] = np.inf
    out = np.zeros((n, 4), np.float32)
    params = np.array([n], np.uint32).tobytes() + np.array([1.5], np.float32).tobytes()
    lib.dispatch("vector_ops", grid=(2, 2), threads=(4, 8), buffers=[a, out, params])
    r = a * np.float32(1.5) + np.stack([np.ones(n), 2 * np.ones(n), a[:, 0], a[:, 1]], 1).astype(np.float32)
    r[:, [0, 1]] = r[:, [1, 0]]
    bad = np.isnan(a) | np.isinf(a)
    r = np.where(bad, -np.inf, r).astype(np.float32)
    r[:, 3] = np.fmax(r[:, 3], -np.finfo(np.float32).max)  # Metal max = fmax
    with np.errstate(over="ignore"):
        ref = r.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out, ref)


def test_half_bfloat_conversions_exhaustive(kernel_lib):
    lib = kernel_lib("elementwise.metal")
    bits = np.arange(65536, dtype=np.uint16)
    rng = np.random.default_rng(1)
    f = np.concatenate([
        rng.standard_normal(30000).astype(np.float32) * np.float32(1000),
        rng.standard_normal(20000).astype(np.float32) * np.float32(1e-5),  # half subnormals
        bits.view(np.float16).astype(np.float32)[:15000] * np.float32(1.0009765625),  # near ties
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 3e38], np.float32),
    ])[:65536].astype(np.float32)
    f = np.resize(f, 65536)
    as_float = np.zeros(65536, np.float32)
    to_half = np.zeros(65536, np.float16)
    to_bf = np.zeros(65536, ml_dtypes.bfloat16)
    lib.dispatch("convert_half", grid=(256,), threads=(256,), buffers=[bits, as_float, f, to_half, to_bf])
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(as_float), nan)
    np.testing.assert_array_equal(as_float[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    with np.errstate(over="ignore"):
        ref_h = f.astype(np.float16)
    nan = np.isnan(ref_h)
    assert np.array_equal(np.isnan(to_half), nan)
    np.testing.assert_array_equal(to_half[~nan].view(np.uint16), ref_h[~nan].view(np.uint16))
    ref_b = f.astype(ml_dtypes.bfloat16)
    nan = np.isnan(ref_b.astype(np.float32))
    np.testing.assert_array_equal(to_bf.view(np.uint16)[~nan], ref_b.view(np.uint16)[~nan])


def test_simd_shuffles_and_reductions(kernel_lib):
    lib = kernel_lib("simd.metal")
    n = 128
    x = np.random.default_rng(2).integers(-50, 50, n).astype(np.float32)
    out = np.zeros((n, 10), np.float32)
    lib.dispatch("simd_ops", grid=(2,), threads=(64,), buffers=[x, out])
    g = x.reshape(-1, 32)
    lane = np.arange(32)
    ref = np.zeros((n // 32, 32, 10), np.float32)
    ref[:, :, 0] = g[:, (lane + 3) % 32]
    ref[:, :, 1] = g[:, lane ^ 5]
    ref[:, :, 2] = np.where(lane >= 2, g[:, np.maximum(lane - 2, 0)], g)
    ref[:, :, 3] = np.where(lane + 3 < 32, g[:, np.minimum(lane + 3, 31)], g)
    ref[:, :, 4] = g[:, 7:8]
    ref[:, :, 5] = g.sum(1, keepdims=True)
    ref[:, :, 6] = g.max(1, keepdims=True)
    ref[:, :, 7] = g.min(1, keepdims=True)
    ref[:, :, 8] = np.cumsum(g, 1) - g
    ref[:, :, 9] = np.cumsum(g, 1)
    np.testing.assert_array_equal(out, ref.reshape(n, 10))


def test_simd_partial_simdgroup(kernel_lib):
    lib = kernel_lib("simd.metal")
    n = 40  # simdgroups of 32 and 8 lanes
    x = np.arange(1, n + 1, dtype=np.int32)
    out = np.zeros((n, 2), np.int32)
    lib.dispatch("simd_partial", grid=1, threads=n, buffers=[x, out])
    s = np.array([x[:32].sum()] * 32 + [x[32:].sum()] * 8)
    p = np.concatenate([np.cumsum(x[:32]), np.cumsum(x[32:])])
    sg = np.array([0] * 32 + [1] * 8)
    np.testing.assert_array_equal(out[:, 0], s)
    np.testing.assert_array_equal(out[:, 1], p + 2 * 1000 + sg * 100000)


def test_simd_vector_shuffle_rows(kernel_lib):
    lib = kernel_lib("simd.metal")
    x = np.random.default_rng(3).integers(-4, 4, (64, 4)).astype(np.float16)
    out = np.zeros_like(x)
    lib.dispatch("simd_vector_shuffle", grid=2, threads=32, buffers=[x, out])
    g = x.reshape(2, 32, 4).astype(np.float32)
    lane = np.arange(32)
    ref = np.zeros_like(g)
    for l in range(32):
        ref[:, l] = g[:, [m for m in range(32) if (m & ~9) == (l & ~9)]].sum(1)
    np.testing.assert_array_equal(out.astype(np.float32), ref.reshape(64, 4))


def test_block_sum_barriers(kernel_lib):
    lib = kernel_lib("barrier.metal")
    x = np.random.default_rng(4).integers(-100, 100, 8 * 256).astype(np.float32)
    out = np.zeros(8, np.float32)
    lib.dispatch("block_sum", grid=8, threads=256, buffers=[x, out], threadgroup_memory=[256 * 4])
    np.testing.assert_array_equal(out, x.reshape(8, 256).sum(1))


def test_reverse_and_sum_kernel_scope_arrays(kernel_lib):
    lib = kernel_lib("barrier.metal")
    x = np.random.default_rng(5).integers(-100, 100, 6 * 160).astype(np.float32)
    rev = np.zeros_like(x)
    sums = np.zeros(6, np.float32)
    lib.dispatch("reverse_and_sum", grid=(3, 2), threads=(16, 10), buffers=[x, rev, sums])
    g = x.reshape(6, 160)
    np.testing.assert_array_equal(rev.reshape(6, 160), g[:, ::-1])
    np.testing.assert_array_equal(sums, g.sum(1))


def test_device_atomics(kernel_lib):
    lib = kernel_lib("barrier.metal")
    counter = np.zeros(1, np.uint32)
    fsum = np.zeros(1, np.float32)
    x = np.ones(64 * 16, np.float32)
    lib.dispatch("atomic_count", grid=16, threads=64, buffers=[counter, fsum, x])
    assert counter[0] == 1024
    assert fsum[0] == 1024.0


def test_simdgroup_barrier_orders_lanes(kernel_lib):
    lib = kernel_lib("barrier.metal")
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    lib.dispatch("simd_exchange", grid=1, threads=64, buffers=[x, out], threadgroup_memory=[256])
    np.testing.assert_array_equal(out, x[np.arange(64) ^ 1])


def _layout():
    lane = np.arange(32)
    row = (lane // 16) * 4 + (lane // 2) % 4
    col = ((lane // 8) % 2) * 4 + (lane % 2) * 2
    return row, col


@pytest.mark.parametrize("name,dt", [("float", np.float32), ("half", np.float16), ("bfloat", "bf16")])
def test_mma8x8_and_lane_layout(kernel_lib, name, dt):
    lib = kernel_lib("matrix.metal")
    dt = ml_dtypes.bfloat16 if dt == "bf16" else dt
    rng = np.random.default_rng(6)
    A = rng.integers(-8, 8, (8, 8)).astype(dt)
    B = rng.integers(-8, 8, (8, 8)).astype(dt)
    C = np.zeros((8, 8), np.float32)
    elems = np.zeros((32, 4), np.float32)
    lib.dispatch(f"mma8x8_{name}", grid=1, threads=32, buffers=[A, B, C, elems])
    ref = A.astype(np.float32) @ B.astype(np.float32) + 0.5
    np.testing.assert_array_equal(C, ref)
    row, col = _layout()
    Af = A.astype(np.float32)
    np.testing.assert_array_equal(elems[:, 0], Af[row, col])
    np.testing.assert_array_equal(elems[:, 1], Af[row, col + 1])
    np.testing.assert_array_equal(elems[:, 2], ref[row, col])
    np.testing.assert_array_equal(elems[:, 3], ref[row, col + 1])


def test_matmul_tiled_threadgroup_and_transpose(kernel_lib):
    lib = kernel_lib("matrix.metal")
    M, N, K = 64, 96, 64
    rng = np.random.default_rng(7)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    Bt = np.ascontiguousarray(B.T)
    C = np.zeros((M, N), np.float32)
    lib.dispatch("matmul_tiled", grid=(N // 32, M // 32), threads=128, buffers=[A, Bt, C, np.array([M, N, K], np.uint32)],
                 threadgroup_memory=[32 * 32 * 4])
    np.testing.assert_allclose(C, A @ B, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transpose_c", [0, 1])
def test_matmul_device_origins(kernel_lib, transpose_c):
    lib = kernel_lib("matrix.metal")
    M, N, K = 24, 16, 32
    rng = np.random.default_rng(8)
    A = rng.integers(-4, 4, (M, K)).astype(np.float16)
    B = rng.integers(-4, 4, (K, N)).astype(np.float16)
    C = np.zeros((N, M) if transpose_c else (M, N), np.float32)
    lib.dispatch("matmul_device", grid=(N // 8, M // 8), threads=32,
                 buffers=[A, B, C, np.array([M, N, K, transpose_c], np.uint32)])
    ref = A.astype(np.float32) @ B.astype(np.float32)
    np.testing.assert_array_equal(C, ref.T if transpose_c else ref)


@pytest.mark.parametrize("name,dt", [("half", np.float16), ("bfloat", "bf16")])
def test_mma_16bit_operands_round_and_accumulate_in_float(kernel_lib, name, dt):
    """16-bit matrices (as the attention kernels use for Q, K, V, dO) round their elements to the
    16-bit type, and a multiply-accumulate into a float matrix adds the products in float."""
    lib = kernel_lib("matrix.metal")
    dt = ml_dtypes.bfloat16 if dt == "bf16" else dt
    rng = np.random.default_rng(9)
    A = rng.uniform(0.2, 0.4, (8, 8)).astype(np.float32)
    B = rng.uniform(0.2, 0.4, (8, 8)).astype(np.float32)
    a16, b16 = (X.astype(dt).astype(np.float64) for X in (A, B))
    for c0, atol in ((0.0, 1e-6), (2048.0, 8 * float(np.spacing(np.float32(2048.0))))):
        C = np.full((8, 8), np.nan, np.float32)
        D = np.full((8, 8), np.nan, np.float32)
        lib.dispatch(f"mma_mixed_precision_{name}", grid=1, threads=32,
                     buffers=[A, B, C, D, np.array(c0, np.float32)])
        # float64 references: operands rounded to the 16-bit type (C), only B rounded (D, P x V).
        np.testing.assert_allclose(C, c0 + a16 @ b16, rtol=0, atol=atol)
        np.testing.assert_allclose(D, c0 + A.astype(np.float64) @ b16, rtol=0, atol=atol)
    # Above, 2048 + ~0.7 kept its fraction to float accuracy (a 16-bit sum has a spacing of 2 or
    # 16 there); and the operands were rounded: at c0 = 0 the unrounded product is measurably off.
    C = np.full((8, 8), np.nan, np.float32)
    lib.dispatch(f"mma_mixed_precision_{name}", grid=1, threads=32,
                 buffers=[A, B, C, np.zeros((8, 8), np.float32), np.array(0.0, np.float32)])
    assert np.abs(C - A.astype(np.float64) @ B.astype(np.float64)).max() > 1e-5

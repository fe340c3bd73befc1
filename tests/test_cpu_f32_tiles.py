"""The float32 tile product of the CPU kernels (cpp/cpu/cpu_f32_tiles.h) on
its own, against a float64 NumPy product: every layout the attention kernels
use, sizes that are not multiples of the 6-row x 64-column register blocks,
outputs poisoned so that unwritten or over-written elements show. Where the
CPU has no AVX-512 the same entry points run the portable loops."""

from __future__ import annotations

import numpy as np
import pytest

from jax_mfa import _native

ext = _native.extension()

# Column counts around the 16-wide vectors and 64-wide groups (85: a full
# group then a partial one, whose last vector has 5 columns).
COLUMNS = [1, 15, 16, 17, 47, 63, 64, 65, 85, 130]


def _reference(a, b, alpha, c0, accumulate):
    r = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    return r + c0 if accumulate else r


def _poisoned_c(rng, M, N, ldc):
    c = np.full((M, ldc), np.nan, np.float32)
    c[:, :N] = rng.standard_normal((M, N))
    return c


def _check(c_out, want, N):
    np.testing.assert_allclose(c_out[:, :N], want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    assert np.isnan(c_out[:, N:]).all(), "columns past N were written"


@pytest.mark.parametrize("N", COLUMNS)
@pytest.mark.parametrize("M, K", [(1, 1), (7, 33), (13, 64), (256, 128)])
@pytest.mark.parametrize("accumulate", [False, True], ids=["store", "accumulate"])
def test_packed_b(M, N, K, accumulate, rng):
    """Q K^T: A row-major in place, B = K^T from pack_panels."""
    a = rng.standard_normal((M, K), dtype=np.float32)
    keys = rng.standard_normal((N, K + 3), dtype=np.float32)  # rows with a stride > K
    panels = np.full((N + 15) // 16 * 16 * K, np.nan, np.float32)
    ext.pack_panels(keys.reshape(-1), K + 3, N, K, panels)
    expected = np.zeros(((N + 15) // 16 * 16, K), np.float32)  # keys zero-padded to 16
    expected[:N] = keys[:, :K]
    expected = expected.reshape(-1, 16, K).transpose(0, 2, 1).reshape(-1)  # [panel][k][16]
    np.testing.assert_array_equal(panels, expected)
    ldc = N + 5
    c = _poisoned_c(rng, M, N, ldc)
    want = _reference(a, keys[:, :K].T, 0.3, c[:, :N].astype(np.float64), accumulate)
    ext.f32_tile_product(M, N, K, 0.3, a.reshape(-1), K, 1, panels, 16, 16 * K, accumulate,
                         c.reshape(-1), ldc)
    _check(c, want, N)


@pytest.mark.parametrize("N", COLUMNS)
@pytest.mark.parametrize("M, K", [(5, 3), (12, 61), (70, 256)])
@pytest.mark.parametrize("transposed_a", [False, True], ids=["a", "a_transposed"])
def test_row_major_b(M, N, K, transposed_a, rng):
    """P V: B rows in place with a row stride (V of interleaved heads); A row
    major or read transposed in place (a_row = 1)."""
    a = rng.standard_normal((M, K), dtype=np.float32)
    if transposed_a:
        stored = np.full((K, M + 2), np.nan, np.float32)
        stored[:, :M] = a.T
        a_row, a_col = 1, M + 2
    else:
        stored = np.full((M, K + 2), np.nan, np.float32)
        stored[:, :K] = a
        a_row, a_col = K + 2, 1
    ldb = N + 9
    b = np.full((K, ldb), np.nan, np.float32)  # NaN past N: any read of it shows
    b[:, :N] = rng.standard_normal((K, N))
    c = _poisoned_c(rng, M, N, N)
    want = _reference(a, b[:, :N], 1.0, c[:, :N].astype(np.float64), True)
    ext.f32_tile_product(M, N, K, 1.0, stored.reshape(-1), a_row, a_col, b.reshape(-1)[:-(ldb - N)],
                         ldb, 16, True, c.reshape(-1), N)
    _check(c, want, N)


def test_layout_outside_the_arrays_is_refused():
    a, b, c = (np.zeros(n, np.float32) for n in (8, 7, 8))
    with pytest.raises(ValueError, match="b: layout reaches element"):
        ext.f32_tile_product(2, 4, 2, 1.0, a, 2, 1, b, 4, 16, False, c, 4)
    with pytest.raises(ValueError, match="M, N and K must be positive"):
        ext.f32_tile_product(0, 4, 2, 1.0, a, 2, 1, b, 4, 16, False, c, 4)

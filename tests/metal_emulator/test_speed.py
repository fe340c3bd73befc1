"""Speed of the emulator: a 256^3 float matmul with simdgroup matrices."""

import time

import numpy as np


def test_matmul_256_speed(kernel_lib):
    lib = kernel_lib("matrix.metal")
    M = N = K = 256
    rng = np.random.default_rng(0)
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    Bt = np.ascontiguousarray(B.T)
    dims = np.array([M, N, K], np.uint32)
    times = {}
    for check in (True, False):
        C = np.zeros((M, N), np.float32)
        t = time.perf_counter()
        lib.dispatch("matmul_tiled", grid=(N // 32, M // 32), threads=128, buffers=[A, Bt, C, dims],
                     threadgroup_memory=[32 * 32 * 4], check=check)
        times[check] = time.perf_counter() - t
        np.testing.assert_allclose(C, A @ B, rtol=1e-4, atol=1e-3)
    print(f"\n256^3 matmul through the emulator: checks on {times[True]:.3f} s, off {times[False]:.3f} s")
    assert times[True] < 5.0

"""Speed of the Metal emulator: a size^3 float matrix multiply written with
simdgroup matrices (tests/metal_emulator/kernels/matrix.metal) and MLX's steel
GEMM (the peer suite's, if MLX's sources can be had), with the checkers on and
off and with the instruction profile on; prints a table and the profile.

    python benchmarks/bench_emulator.py [--size 256] [--repeats 3] [--workers N]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

import jax_mfa.metal_emulator as me

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "metal_emulator"


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="M = N = K (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="worker threads (default: the default pool)")
    args = parser.parse_args()
    n = args.size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    bt = np.ascontiguousarray(b.T)
    dims = np.array([n, n, n], np.uint32)
    lib = me.load(str(TESTS / "kernels" / "matrix.metal"))

    kernels = []

    def ours(**kw):
        c = np.zeros((n, n), np.float32)
        prof = lib.dispatch("matmul_tiled", grid=(n // 32, n // 32), threads=128, buffers=[a, bt, c, dims],
                            threadgroup_memory=[32 * 32 * 4], workers=args.workers, **kw)
        np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-3)
        return prof

    kernels.append(("simdgroup-matrix matmul (tests/metal_emulator/kernels/matrix.metal)", ours))
    try:
        sys.path.insert(0, str(TESTS))
        import mlx_peer

        mlx_lib = mlx_peer.load("steel_gemm.metal")

        def mlx(**kw):
            d, prof = mlx_peer.gemm(mlx_lib, "float32", False, False, a[None], b[None], workers=args.workers, **kw)
            np.testing.assert_allclose(d[0], a @ b, rtol=1e-4, atol=1e-3)
            return prof

        kernels.append(("MLX steel GEMM (bm 32, bn 32, bk 16, 2x2 simdgroups)", mlx))
    except BaseException as e:  # pytest.skip raises an exception derived from BaseException
        print(f"(MLX's steel GEMM skipped: {e})")

    print(f"{n}^3 float32 matrix multiply, median of {args.repeats} runs, workers={args.workers}")
    print(f"| kernel | checks on | checks off | checks on + profile |")
    print("|---|---|---|---|")
    profiles = []
    for name, fn in kernels:
        on = _median_time(lambda: fn(check=True), args.repeats)
        off = _median_time(lambda: fn(check=False), args.repeats)
        prof_t = _median_time(lambda: fn(check=True, profile=True), args.repeats)
        profiles.append((name, fn(check=False, profile=True)))
        print(f"| {name} | {on:.3f} s | {off:.3f} s | {prof_t:.3f} s |")
    for name, prof in profiles:
        print(f"\nProfile of {name}: {prof.threadgroups} threadgroups x {prof.simdgroups_per_threadgroup} "
              f"simdgroups, {prof.threadgroup_memory_bytes} bytes of threadgroup memory")
        mean = prof.mean_per_simdgroup()
        for key, total in prof.total.items():
            if total:
                print(f"  {key:40s} total {total:>12d}   per simdgroup {mean[key]:>12.1f}   "
                      f"max {prof.max_simdgroup[key]:>10d}")


if __name__ == "__main__":
    main()

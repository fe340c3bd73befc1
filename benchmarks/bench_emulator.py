"""Speed of the Metal emulator: a 256x256x256 float matrix multiply written
with simdgroup matrices (tests/metal_emulator/kernels/matrix.metal), with the
checkers on and off.

    python benchmarks/bench_emulator.py [--size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np

import jax_mfa.metal_emulator as me

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "tests" / "metal_emulator" / "kernels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="M = N = K (multiple of 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lib = me.load(str(KERNELS / "matrix.metal"))
    n = args.size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    bt = np.ascontiguousarray(b.T)
    dims = np.array([n, n, n], np.uint32)
    for check in (True, False):
        times = []
        for _ in range(args.repeats):
            c = np.zeros((n, n), np.float32)
            start = time.perf_counter()
            lib.dispatch("matmul_tiled", grid=(n // 32, n // 32), threads=128,
                         buffers=[a, bt, c, dims], threadgroup_memory=[32 * 32 * 4], check=check)
            times.append(time.perf_counter() - start)
            np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-3)
        print(f"{n}^3 simdgroup-matrix matmul, checks {'on ' if check else 'off'}: "
              f"median {np.median(times):.3f} s over {args.repeats} runs")


if __name__ == "__main__":
    main()

"""Profile lines (JAX_MFA_PROFILE=1, printed on stderr by the kernels) of the
16-bit CPU forward rows of issue 12, and their times: float16 / bfloat16 /
float32, H 64 and 128, T=S 2048 and 4096 (--lengths), full and causal.
Run with JAX_PLATFORMS=cpu JAX_MFA_PROFILE=1 (and under taskset for the
2-core proxy)."""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jax_mfa import _benchmark as bm  # noqa: E402
from bench_cpu import call  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--lengths", default="2048,4096")
ap.add_argument("--dtypes", default="float16,bfloat16,float32")
args = ap.parse_args()
for L in map(int, args.lengths.split(",")):
    for H in (64, 128):
        for causal in (False, True):
            for dt in args.dtypes.split(","):
                x = bm.make_inputs(1, L, L, 8, 8, H, dtype=getattr(jnp, dt))
                fn, a = call("cpu", x, is_causal=causal)
                for _ in range(2):
                    jax.block_until_ready(fn(*a))
                t = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*a))
                    t.append(time.perf_counter() - t0)
                print(f"^ {dt} H={H} L={L} causal={causal}: min {min(t) * 1e3:.2f} ms",
                      file=sys.stderr, flush=True)

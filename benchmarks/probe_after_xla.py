"""Does a call run slower right after a long XLA call? Times jax_mfa's CPU
kernels and torch's fused CPU SDPA alone and a fixed pause after an XLA call
(and jax_mfa after torch), bfloat16, B=1, N=8, T=S=--length; medians of
--repeats. This is the measurement behind median_times' `settle_ratio`
(benchmarks/RESULTS.md, "what a long XLA call leaves behind"). Meant for a
few cores:

    OMP_NUM_THREADS=2 taskset -c 0,1 python benchmarks/probe_after_xla.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pauses", default="0.02,0.1,0.3", help="seconds after the XLA call")
    ap.add_argument("--xla", default="xla",
                    help="the XLA call: jax_mfa's 'xla' implementation (the measured runs) or "
                         "'jax.nn' (bench_cpu's reference)")
    args = ap.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
    import jax
    import jax.numpy as jnp
    import torch

    from bench_cpu import call, torch_call
    from jax_mfa import _benchmark as bm

    torch.set_num_threads(len(os.sched_getaffinity(0)))

    def run(c):
        t0 = time.perf_counter()
        jax.block_until_ready(c[0](*c[1]))
        return (time.perf_counter() - t0) * 1e3

    pauses = [float(p) for p in args.pauses.split(",")]
    for H, causal in ((64, True), (64, False), (128, True)):
        x = bm.make_inputs(1, args.length, args.length, 8, 8, H, dtype=jnp.bfloat16)
        ours = call("cpu", x, is_causal=causal)
        xla = call(args.xla, x, is_causal=causal)
        tor = torch_call(*x, is_causal=causal)
        for c in (ours, xla, tor):
            run(c)
        cases = [("jax_mfa alone", ours, None, 0.02), ("torch alone", tor, None, 0.02),
                 ("jax_mfa after torch, 20 ms", ours, tor, 0.02)]
        for pause in pauses:
            cases += [(f"jax_mfa after XLA, {pause * 1e3:.0f} ms", ours, xla, pause),
                      (f"torch after XLA, {pause * 1e3:.0f} ms", tor, xla, pause)]
        results = []
        for name, who, before, pause in cases:
            samples = []
            for _ in range(args.repeats):
                if before:
                    run(before)
                time.sleep(pause)
                samples.append(run(who))
            results.append(f"{name} {statistics.median(samples):.1f}")
        print(f"H={H} {'causal' if causal else 'full'} (ms): " + ", ".join(results), flush=True)


if __name__ == "__main__":
    main()

"""jax_mfa's CPU forward under environment settings (tuning switches such as
JAX_MFA_DOT_STRIP, JAX_MFA_TILES, JAX_MFA_F16_SPLIT), each in its own process
so that nothing read once per process leaks between them, next to torch's
fused CPU SDPA. Medians of --repeats calls after warm-up; B=1, N=8.

    python benchmarks/bench_cpu_variants.py --dtype bfloat16 \
        --variant "" --variant JAX_MFA_DOT_STRIP=256 [--threads 2]

--threads n pins every process to the first n usable CPUs (taskset-like,
os.sched_setaffinity; torch then runs n threads). Prints one row per variant:
the forward ms of each case, in the order of the header.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(64, 2048, False), (64, 2048, True), (128, 2048, False), (64, 4096, False),
         (128, 4096, False)]


def child(dtype: str, torch_side: bool, repeats: int):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import jax.numpy as jnp

    from bench_cpu import call, torch_call
    from jax_mfa import _benchmark as bm

    if torch_side:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    times = []
    for H, L, causal in CASES:
        x = bm.make_inputs(1, L, L, 8, 8, H, dtype=getattr(jnp, dtype))
        c = torch_call(*x, is_causal=causal) if torch_side else call("cpu", x, is_causal=causal)
        times.append(bm.median_times([c], repeats=repeats)[0] * 1e3)
    print("TIMES", " ".join(f"{t:.1f}" for t in times), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variant", action="append", default=None,
                    help='space-separated NAME=VALUE settings ("" = defaults); repeatable')
    ap.add_argument("--threads", type=int, default=0, help="pin to this many CPUs (0: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1] == "torch", args.repeats)
    cpus = sorted(os.sched_getaffinity(0))
    if args.threads:
        cpus = cpus[:args.threads]
    rows = [("torch", "torch", {})] if not args.no_torch else []
    for v in args.variant or [""]:
        env = dict(kv.split("=", 1) for kv in v.split())
        rows.append((v or "defaults", "ours", env))
    print(f"{args.dtype}, {len(cpus)} CPUs, forward ms, medians of {args.repeats}")
    print("| variant | " + " | ".join(f"H={H} T=S={L}{' causal' if c else ''}"
                                     for H, L, c in CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for name, side, env in rows:
        cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats),
               "--child", args.dtype, side]
        out = subprocess.run(cmd, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                       "OMP_NUM_THREADS": str(len(cpus)), **env},
                             capture_output=True, text=True,
                             preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("TIMES")), None)
        if line is None:
            print(f"| {name} | failed: {(out.stderr or out.stdout)[-300:]!r} |")
            continue
        print(f"| {name} | " + " | ".join(line.split()[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()

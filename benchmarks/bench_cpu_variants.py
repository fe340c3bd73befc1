"""jax_mfa's CPU forward under environment settings (tuning switches such as
JAX_MFA_DOT_STRIP, JAX_MFA_TILES, JAX_MFA_F16_SPLIT), each in its own process
so that nothing read once per process leaks between them, next to torch's
fused CPU SDPA. Medians of --repeats calls after warm-up; B=1, N=8; T=S in
--lengths, H in --head-dims, full and causal.

    python benchmarks/bench_cpu_variants.py --dtypes bfloat16 \
        --variant "" --variant JAX_MFA_DOT_STRIP=256 [--threads 2] [--profile]

--threads n pins every process to the first n usable CPUs (taskset-like,
os.sched_setaffinity; torch then runs n threads). --profile also prints the
kernels' own profile line of each timed configuration (JAX_MFA_PROFILE=1:
product rates, tasks and CPU time per thread, phases). Prints one table row
per dtype and variant: the forward ms of each case, in the header's order.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cases(lengths: str, head_dims: str):
    return [(H, L, causal) for L in map(int, lengths.split(","))
            for H in map(int, head_dims.split(",")) for causal in (False, True)]


def child(args, dtype: str, torch_side: bool):
    """Times every case in this process; prints "TIMES ..." (and, with
    JAX_MFA_PROFILE=1, the kernels print a profile line per call on stderr)."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import jax.numpy as jnp

    from bench_cpu import call, torch_call
    from jax_mfa import _benchmark as bm

    if torch_side:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    times = []
    for H, L, causal in cases(args.lengths, args.head_dims):
        x = bm.make_inputs(1, L, L, 8, 8, H, dtype=getattr(jnp, dtype))
        c = torch_call(*x, is_causal=causal) if torch_side else call("cpu", x, is_causal=causal)
        print(f"CASE {dtype} H={H} T=S={L} causal={causal}", file=sys.stderr, flush=True)
        times.append(bm.median_times([c], repeats=args.repeats)[0] * 1e3)
    print("TIMES", " ".join(f"{t:.1f}" for t in times), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated")
    ap.add_argument("--variant", action="append", default=None,
                    help='space-separated NAME=VALUE settings ("" = defaults); repeatable')
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--threads", type=int, default=0, help="pin to this many CPUs (0: all)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print the kernels' profile lines (JAX_MFA_PROFILE=1)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args, args.child[0], args.child[1] == "torch")
    cpus = sorted(os.sched_getaffinity(0))
    if args.threads:
        cpus = cpus[:args.threads]
    variants = [("torch", "torch", {})] if not args.no_torch else []
    for v in args.variant or [""]:
        variants.append((v or "defaults", "ours", dict(kv.split("=", 1) for kv in v.split())))
    header = cases(args.lengths, args.head_dims)
    print(f"{len(cpus)} CPUs, forward ms, medians of {args.repeats}")
    print("| dtype | variant | " + " | ".join(
        f"H={H} T=S={L}{' causal' if c else ''}" for H, L, c in header) + " |")
    print("|---|---|" + "---|" * len(header))
    profiles = []
    for dtype in args.dtypes.split(","):
        for name, side, env in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats),
                   "--lengths", args.lengths, "--head-dims", args.head_dims,
                   "--child", dtype, side]
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": str(len(cpus)),
                   **({"JAX_MFA_PROFILE": "1"} if args.profile and side == "ours" else {}),
                   **env}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                 preexec_fn=lambda: os.sched_setaffinity(0, cpus))
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("TIMES")), None)
            if line is None:
                print(f"| {dtype} | {name} | failed: {(out.stderr or out.stdout)[-300:]!r} |")
                continue
            print(f"| {dtype} | {name} | " + " | ".join(line.split()[1:]) + " |", flush=True)
            if args.profile and side == "ours":
                profiles += [f"[{name}] {ln}" for ln in out.stderr.splitlines()
                             if ln.startswith(("CASE", "jax_mfa forward"))]
    if profiles:
        print("\nProfile lines (warm-up and calibration calls included):")
        print("\n".join(profiles))


if __name__ == "__main__":
    main()

"""float32 CPU forward+backward: per-run times of jax_mfa and XLA, and what
the kernels spend them on (issue 12's "2.5x XLA in each of five runs").

    python benchmarks/bench_cpu_f32_spread.py [--length 4096] [--runs 5]
        [--fwd-length 2048] [--no-torch] [--profile] [--tiles "256,256,256,256;..."]

1. Five runs as benchmarks/bench_cpu.py makes them (each run: a warm-up and one
   timed call of jax_mfa and of jax.nn, interleaved), printing both times of
   every run, so that a low ratio can be traced to one side; then the same
   again right after a NumPy SGEMM (bench_cpu.py measures the SGEMM rate just
   before its runs, and NumPy's OpenBLAS threads keep spinning for a while).
2. Medians of 7 of jax_mfa's fwd+bwd and forward at 4096.
3. Forward at --fwd-length against torch's fused CPU SDPA, interleaved.
4. With --tiles: jax_mfa under each JAX_MFA_TILES setting, interleaved.
5. With --profile: the five runs and the calls again in a child process with
   JAX_MFA_PROFILE=1 (per product rates, tasks and CPU time per thread, wall
   time of the phases), printed as the kernels report them.

B=1, N=8, H=64, float32, not causal; B, N, H as in bench_cpu.py's main rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# The CPU kernels against XLA's CPU code, also on a machine with a GPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jax  # noqa: E402

from jax_mfa import _benchmark as bm  # noqa: E402

B, N, H = 1, 8, 64


def five_runs(x, runs: int, label: str):
    calls = [bm.attention_call("cpu", *x, backward=True),
             bm.attention_call(bm.REFERENCE, *x, backward=True)]
    print(f"\n{label}: per run (warm-up + one timed call each, interleaved)")
    print("| run | jax_mfa (ms) | XLA (ms) | XLA / jax_mfa |")
    print("|---|---|---|---|")
    for i in range(runs):
        tc, tx = bm.median_times(calls, repeats=1, min_time=0)
        print(f"| {i + 1} | {tc * 1e3:.1f} | {tx * 1e3:.1f} | {tx / tc:.2f}x |", flush=True)


def medians(x, fwd_x, args):
    fb = bm.attention_call("cpu", *x, backward=True)
    f = bm.attention_call("cpu", *x)
    tb, tf = bm.median_times([fb, f], repeats=7)
    print(f"\njax_mfa T=S={args.length}: fwd+bwd {tb * 1e3:.1f} ms, fwd {tf * 1e3:.1f} ms "
          f"(medians of 7)")
    calls = [bm.attention_call("cpu", *fwd_x)]
    names = ["jax_mfa"]
    if not args.no_torch:
        try:
            import bench_cpu
            if bench_cpu.torch is not None:
                calls.append(bench_cpu.torch_call(*fwd_x))
                names.append("torch")
        except ImportError:
            pass
    times = bm.median_times(calls, repeats=9)
    print(f"forward T=S={args.fwd_length}: " + ", ".join(
        f"{n} {t * 1e3:.2f} ms" for n, t in zip(names, times))
        + (f": torch / jax_mfa {times[1] / times[0]:.2f}x" if len(times) > 1 else ""))


def tile_variants(x, fwd_x, tiles):
    """jax_mfa's fwd (fwd_x) and fwd+bwd (x) under each JAX_MFA_TILES setting
    ("fwd_rows,fwd_cols,bwd_rows,bwd_cols"; the kernels read it per call)."""
    def with_tiles(t, fn):
        def run(*a):
            os.environ["JAX_MFA_TILES"] = t
            return fn(*a)
        return run
    calls = []
    for t in tiles:
        for xs, backward in ((fwd_x, False), (x, True)):
            fn, a = bm.attention_call("cpu", *xs, backward=backward)
            calls.append((with_tiles(t, fn), a))
    times = bm.median_times(calls, repeats=7)
    os.environ.pop("JAX_MFA_TILES", None)
    print(f"\ntiles (fwd rows,cols,bwd rows,cols): fwd T=S={fwd_x[0].shape[1]} | "
          f"fwd+bwd T=S={x[0].shape[1]} (medians of 7, interleaved)")
    for i, t in enumerate(tiles):
        print(f"  {t}: {times[2 * i] * 1e3:.2f} ms | {times[2 * i + 1] * 1e3:.1f} ms")


def profile(x, fwd_x, runs: int):
    five_runs(x, runs, f"fwd+bwd T=S={x[0].shape[1]}, profiled (the kernels' lines on stderr)")
    for label, xs, backward in ((f"fwd+bwd T=S={x[0].shape[1]}", x, True),
                                (f"fwd T=S={fwd_x[0].shape[1]}", fwd_x, False)):
        fn, a = bm.attention_call("cpu", *xs, backward=backward)
        jax.block_until_ready(fn(*a))
        print(f"\nprofile {label} (3 calls after a warm-up):", file=sys.stderr, flush=True)
        for _ in range(3):
            jax.block_until_ready(fn(*a))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--fwd-length", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tiles", default="", help="';'-separated JAX_MFA_TILES settings to time")
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    x = bm.make_inputs(B, args.length, args.length, N, N, H)
    fwd_x = bm.make_inputs(B, args.fwd_length, args.fwd_length, N, N, H)
    if args.profile_child:
        return profile(x, fwd_x, args.runs)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, jax {jax.__version__}, "
          f"B={B}, N={N}, H={H}, float32")
    five_runs(x, args.runs, f"fwd+bwd T=S={args.length}")
    bm.sgemm_gflops(2048)
    five_runs(x, args.runs, f"fwd+bwd T=S={args.length}, right after a NumPy SGEMM")
    medians(x, fwd_x, args)
    if args.tiles:
        tile_variants(x, fwd_x, args.tiles.split(";"))
    if args.profile:
        sys.stdout.flush()
        env = dict(os.environ, JAX_MFA_PROFILE="1")
        subprocess.run([sys.executable, __file__, "--profile-child", "--length", str(args.length),
                        "--fwd-length", str(args.fwd_length), "--runs", str(args.runs)], env=env,
                       check=True)


if __name__ == "__main__":
    main()

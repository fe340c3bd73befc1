"""Ring attention against gathered attention on sequence-sharded inputs.

    python3 benchmarks/bench_ring.py [--length 16384] [--devices 2] [--repeats 3]
                                     [--passes fwd,fwd+bwd] [--masks full,causal]
                                     [--warmup 1]

Inputs q, k, v (float32, B=1, N=8, H=64, T=S=length) are sharded over the
sequence on `devices` CPU devices (--xla_force_host_platform_device_count, set
here before JAX starts). Three ways, all jitted, timed interleaved (medians):

  ring      jax_mfa.attention on the sharded inputs: ring attention, each
            device computes its rows against every key block (zigzag when causal)
  gathered  the inputs all-gathered first, every device computing the whole
            attention (what jit did before sequence sharding was supported)
  single    the whole attention on one device (reference)

Forward, and forward+backward, causal and not. The host devices share the
machine's cores, so "ring" can beat "gathered" by up to the device count but
not "single" by more than the cores allow. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--passes", default="fwd,fwd+bwd",
                   help="comma-separated: fwd, fwd+bwd")
    p.add_argument("--masks", default="full,causal", help="comma-separated: full, causal")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls before median_times' own untimed calibration "
                        "call (which compiles): 0 saves one run of each")
    return p.parse_args()


def main():
    args = parse()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_mfa
    from jax_mfa._benchmark import make_inputs, median_times

    n, L = args.devices, args.length
    mesh = jax.make_mesh((n,), ("s",), axis_types=(AxisType.Auto,))
    seq, whole = NamedSharding(mesh, P(None, "s")), NamedSharding(mesh, P())
    q, k, v, do = make_inputs(1, L, L, args.heads, args.heads, 64)
    sharded = [jax.device_put(x, seq) for x in (q, k, v, do)]
    one = [jax.device_put(x, jax.devices()[0]) for x in (q, k, v, do)]

    def variants(causal: bool, backward: bool):
        def attn(q, k, v):
            return jax_mfa.attention(q, k, v, is_causal=causal, implementation="cpu")

        def gathered(q, k, v):
            q, k, v = (jax.lax.with_sharding_constraint(x, whole) for x in (q, k, v))
            return jax.lax.with_sharding_constraint(attn(q, k, v), seq)

        def timed(f):
            if not backward:
                return jax.jit(lambda q, k, v, do: f(q, k, v))
            loss = lambda q, k, v, do: jnp.sum(f(q, k, v) * do)  # noqa: E731
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

        return {"ring": (timed(attn), sharded), "gathered": (timed(gathered), sharded),
                "single": (timed(attn), one)}

    print(f"devices={n} T=S={L} B=1 N={args.heads} H=64 float32, medians of "
          f"{args.repeats}, {os.cpu_count()} CPU cores")
    print("| pass | mask | ring (s) | gathered (s) | single device (s) | ring speed-up "
          "over gathered |")
    print("|---|---|---|---|---|---|")
    start = time.perf_counter()
    for backward in [p == "fwd+bwd" for p in args.passes.split(",")]:
        for causal in [m == "causal" for m in args.masks.split(",")]:
            calls = variants(causal, backward)
            times = dict(zip(calls, median_times(list(calls.values()), repeats=args.repeats,
                                                 warmup=args.warmup, min_time=0)))
            print(f"| {'fwd+bwd' if backward else 'fwd'} | {'causal' if causal else 'full'} "
                  f"| {times['ring']:.2f} | {times['gathered']:.2f} | {times['single']:.2f} "
                  f"| {times['gathered'] / times['ring']:.2f}x |", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

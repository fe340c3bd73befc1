"""Peak memory per device of ring attention against one device: run as a
script with 4 host devices (tests/test_sharding.py::test_ring_memory starts it).

    python tests/ring_memory_case.py LENGTH [--full] [--forward]

Causal (or with --full unmasked) self-attention, float32, B=1, N=4, H=64, T=S=LENGTH: the forward
alone ("_fwd", with --forward) and forward and backward. Two measures per program: XLA's buffer assignment for one device
(arguments + outputs + temporaries, from the compiled program's
memory_analysis; the kernels' own scratch is a few tiles and not in it), and
the growth of the process's peak resident set across one call (the host
devices share the process: the ring's growth is divided by 4). Prints
"MEMORY <name> <per-device MiB (XLA)> <per-device MiB (RSS)> <arguments and
outputs MiB> <temporaries MiB>" and "ALL OK".
"""

from __future__ import annotations

import os
import sys

# This checkout's jax_mfa, also when run as a plain script (sys.path[0] is tests/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_mfa  # noqa: E402
from jax_mfa._benchmark import peak_rss_during  # noqa: E402

MIB = 2.0**20
CAUSAL = "--full" not in sys.argv  # --full: no mask (no zigzag copies)
FORWARD = "--forward" in sys.argv  # also the forward alone


def per_device_bytes(compiled) -> tuple[int, int]:
    """(arguments + outputs, temporaries) of one device's program."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes, m.temp_size_in_bytes


def measure(name, args, devices: int, backward: bool = True):
    def loss(q, k, v, w):
        return jnp.sum(jax_mfa.attention(q, k, v, is_causal=CAUSAL, implementation="cpu") * w)

    def forward(q, k, v, w):
        return jax_mfa.attention(q, k, v, is_causal=CAUSAL, implementation="cpu")

    program = jax.jit(jax.grad(loss, argnums=(0, 1, 2)) if backward else forward)
    compiled = program.lower(*args).compile()
    io, temp = (x / MIB for x in per_device_bytes(compiled))
    xla = io + temp
    jax.block_until_ready(args)
    _, growth, _ = peak_rss_during(compiled, *args)
    # Inputs are allocated before the call; count them as XLA does.
    inputs = sum(a.nbytes for a in args) / MIB
    rss = (growth / MIB + inputs) / devices
    print(f"MEMORY {name} {xla:.1f} {rss:.1f} {io:.1f} {temp:.1f}", flush=True)
    return xla, rss


def main():
    L = int(sys.argv[1])
    B, N, H = 1, 4, 64
    n = len(jax.devices())
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (B, L, N, H)
    q, k, v, w = (jax.random.normal(key, shape, jnp.float32) for key in keys)
    one = jax.devices()[0]
    mesh = jax.make_mesh((n,), ("s",), axis_types=(AxisType.Auto,))
    seq = NamedSharding(mesh, P(None, "s"))
    for suffix, backward in (("_fwd", False), ("", True))[0 if FORWARD else 1:]:
        single = measure("single" + suffix, [jax.device_put(x, one) for x in (q, k, v, w)], 1,
                         backward)
        ring = measure("ring" + suffix, [jax.device_put(x, seq) for x in (q, k, v, w)], n,
                       backward)
        print(f"RATIO{suffix} xla={ring[0] / single[0]:.3f} rss={ring[1] / single[1]:.3f}")
    print("ALL OK")


if __name__ == "__main__":
    main()

"""One of two processes of tests/test_sharding.py::test_two_processes.

    python tests/multiprocess_case.py PROCESS_ID PORT

Both processes join through jax.distributed on 127.0.0.1 (CPU collectives:
gloo), each with one CPU device, and run head-sharded attention and ring
attention (jit with sequence-sharded inputs, and ring_attention under
shard_map) across the two, forward and backward. Each compares the shards it
holds with the same call computed unsharded on its own device. Prints
"PROCESS <id> OK".
"""

from __future__ import annotations

import os
import sys

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid)
    import jax_mfa
    from support import relative_error

    assert jax.process_count() == 2 and len(jax.devices()) == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(7)  # the same inputs in both processes
    B, T, N, K, H = 2, 14, 4, 2, 8  # 7 rows per process: zigzag pads
    q, w = (rng.standard_normal((B, T, N, H)) for _ in range(2))
    k, v = (rng.standard_normal((B, T, K, H)) for _ in range(2))
    wl = rng.standard_normal((B, T, N))
    local = jax.local_devices()[0]

    def loss(attn):
        def f(q, k, v):
            out, lse = attn(q, k, v)
            return jnp.sum(out * w) + jnp.sum(lse * wl), (out, lse)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

    def fused(q, k, v):
        return jax_mfa.attention(q, k, v, is_causal=True, return_residual=True,
                                 implementation="cpu")

    def ring(q, k, v):
        return jax_mfa.ring_attention(q, k, v, axis_name="x", is_causal=True,
                                      return_residual=True, implementation="cpu")

    want_grads, want = loss(fused)(*(jax.device_put(x, local) for x in (q, k, v)))
    want = jax.tree.map(np.asarray, (want, want_grads))

    def global_array(x, spec):
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    seq, heads = P(None, "x"), P(None, None, "x")
    smap = jax.shard_map(ring, mesh=mesh, in_specs=(seq,) * 3, out_specs=(seq, P(None, "x")))
    runs = {"heads": (fused, heads), "ring jit": (fused, seq), "ring shard_map": (smap, seq)}
    for name, (attn, spec) in runs.items():
        grads, outs = loss(attn)(*(global_array(x, spec) for x in (q, k, v)))
        for got, expected in zip(jax.tree.leaves((outs, grads)), jax.tree.leaves(want)):
            for shard in got.addressable_shards:
                err = relative_error(shard.data, expected[shard.index])
                assert err < 1e-12, (name, err)
        print(f"PROCESS {pid} {name} OK", flush=True)
    print(f"PROCESS {pid} OK", flush=True)


if __name__ == "__main__":
    main()

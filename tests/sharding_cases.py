"""Sharded jax_mfa.attention against the unsharded call: run as a script in a
subprocess with host devices (tests/test_sharding.py starts it).

    python tests/sharding_cases.py MESH_KIND [CASE ...]

MESH_KIND: "heads", "seq" or "bhs" (batch x heads x sequence) over all
devices. Each case compares the output, the lse and the gradients of query,
key, value and bias (through a loss using both outputs) with the same call on
one device, for the jit path with sharded inputs (custom partitioning) and,
where the sequence is sharded, for jax_mfa.ring_attention under shard_map.
Prints "CASE <name> <path> <worst relative error>" lines and "ALL OK".
"""

from __future__ import annotations

import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax_mfa  # noqa: E402
from support import relative_error  # noqa: E402

TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


def mesh_for(kind: str, n: int):
    if kind == "bhs":
        shape, names = {2: (1, 1, 2), 4: (1, 2, 2), 8: (2, 2, 2)}[n], ("b", "h", "s")
    else:  # any n (an odd ring pairs its middle device with itself)
        shape, names = (n,), {"heads": ("h",), "seq": ("s",)}[kind]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def axis(mesh, name):
    """The mesh axis `name` if the mesh has it (else None: replicated)."""
    return name if name in mesh.axis_names else None


# Case: sizes (B, T, S, N, K, H) as functions of the device count n, options,
# optional bias/mask shapes ("full" = (B, N, T, S)), dtype.
def cases(kind: str, n: int) -> dict:
    odd = 5  # rows per device: odd, so the layout's chunks need padding
    if kind == "heads":
        return {
            # Sinks shard with the query heads.
            "kv_heads_divide_causal_sinks": dict(size=(2, 13, 11, 2 * n, n, 8), is_causal=True,
                                                 bias="full", sinks=True, segments=True),
            "mqa_broadcast_bias_mask": dict(size=(2, 13, 11, 2 * n, 1, 8), bias=(1, 1, 13, 11),
                                            mask=(2, 1, 13, 11), softcap=3.0),
            "gqa_each_own_head_lengths": dict(size=(2, 9, 12, 3 * n, 3, 8), lengths=True,
                                              bias=(1, 3 * n, 1, 12)),
            "float32_gqa_causal": dict(size=(2, 13, 13, 2 * n, 2, 8), is_causal=True,
                                       dtype=jnp.float32),
            # Each device draws its heads' part of the mask (K = 2 divides the
            # head shards or is replicated).
            "dropout_gqa_causal_sinks": dict(size=(2, 13, 11, 2 * n, 2, 8), is_causal=True,
                                             sinks=True, dropout=0.3),
        }
    if kind == "seq":
        L = odd * n
        return {
            # Segment ids travel with the key/value blocks; sinks join the
            # final merge; dropout draws from each block's absolute rows (odd
            # chunks: odd key origins).
            "causal_gqa_odd": dict(size=(2, L, L, 4, 1, 8), is_causal=True, bias=(2, 1, L, L),
                                   lengths=True, segments=True, sinks=True, dropout=0.3),
            "full_t_ne_s_mask": dict(size=(2, 3 * n, L, 4, 2, 8), mask=(2, 1, 3 * n, L),
                                     bias=(1, 1, 1, L), segments=True, dropout=0.3),
            "window_odd": dict(size=(2, L, L, 2, 1, 8), local_window_size=(3, 2),
                               bias=(1, 2, L, L), sinks=True),
            "causal_t_ne_s_softcap": dict(size=(1, 3 * n, L, 2, 2, 8), is_causal=True,
                                          softcap=2.0, lengths=True),
            # Even rows per device: the layout's chunks without padding
            # (dropout: one kernel call per chunk pair although no lengths).
            "float32_causal": dict(size=(2, 4 * n, 4 * n, 4, 2, 8), is_causal=True,
                                   dtype=jnp.float32, bias="full", dropout=0.2),
            # Lengths the ring size does not divide (sharded inside jit, as
            # device_put refuses): padded inside the partitioning.
            "uneven_causal": dict(size=(2, L + 1, L + 1, 2, 1, 8), is_causal=True, uneven=True,
                                  bias=(2, 1, L + 1, L + 1), segments=True, sinks=True),
            "uneven_t_ne_s_lengths": dict(size=(1, L - 2, 3 * n + 1, 2, 2, 8), lengths=True,
                                          mask=(1, 1, L - 2, 3 * n + 1), uneven=True,
                                          dropout=0.4),
            # ring_attention on the "xla" implementation's kernels.
            "xla_kernels_causal_odd": dict(size=(1, L, L, 2, 1, 8), is_causal=True,
                                           bias=(1, 2, L, L), ring_implementation="xla"),
        }
    L = odd * n
    return {
        "causal_gqa_bias": dict(size=(2, L, L, 4, 2, 8), is_causal=True, bias="full",
                                lengths=True, segments=True, sinks=True),
        "full_broadcast_bias": dict(size=(2, 3 * n, L, 4, 2, 8), bias=(1, 4, 1, L)),
        "float32_causal_mqa": dict(size=(2, L, L, 4, 1, 8), is_causal=True, dtype=jnp.float32),
        # Batch rows, heads and blocks each draw their part of the mask. Not
        # under shard_map: ring_attention sees local batch rows and heads there.
        "dropout_causal_gqa": dict(size=(2, L, L, 4, 2, 8), is_causal=True, dropout=0.3,
                                   shard_map=False),
    }


def make_inputs(case, rng):
    B, T, S, N, K, H = case["size"]
    dtype = case.get("dtype", jnp.float64)
    arr = lambda shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q, k, v = arr((B, T, N, H)), arr((B, S, K, H)), arr((B, S, K, H))
    bias = mask = None
    if case.get("bias"):
        shape = (B, N, T, S) if case["bias"] == "full" else case["bias"]
        bias = arr(shape)
    if case.get("mask"):
        m = rng.random(case["mask"]) < 0.7
        mask = jnp.asarray(m)
    kw = {}
    for name in ("is_causal", "softcap", "local_window_size"):
        if name in case:
            kw[name] = case[name]
    if case.get("lengths"):
        kw["query_seq_lengths"] = jnp.asarray(rng.integers(T // 2, T + 1, (B,)), jnp.int32)
        kw["key_value_seq_lengths"] = jnp.asarray(
            np.minimum(rng.integers(1, S + 1, (B,)), S), jnp.int32)
        kw["key_value_seq_lengths"] = kw["key_value_seq_lengths"].at[0].set(S)
    if case.get("segments"):
        # Packed sequences: sorted ids; the keys' split differs from the
        # queries' so that blocks see partial matches.
        kw["query_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1),
                                              jnp.int32)
        kw["key_value_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1),
                                                  jnp.int32)
    if case.get("sinks"):
        kw["sinks"] = arr((N,))
    if case.get("dropout"):
        kw["dropout_rate"] = case["dropout"]
        kw["dropout_rng"] = jax.random.key(int(rng.integers(0, 2**31)))
    w = arr((B, T, N, H))
    wl = arr((B, T, N))
    return (q, k, v, bias, mask), kw, (w, wl)


def run_case(mesh, name, case, rng):
    (q, k, v, bias, mask), kw, (w, wl) = make_inputs(case, rng)
    B, T, S, N, K, H = case["size"]
    b, h, s = axis(mesh, "b"), axis(mesh, "h"), axis(mesh, "s")
    heads_ok = h is not None
    kv_h = h if heads_ok and K % mesh.shape[h] == 0 else None

    # Options and the dropout key (replicated) are not sharded.
    static = {key: val for key, val in kw.items()
              if not isinstance(val, jax.Array) or key == "dropout_rng"}
    kw = {key: val for key, val in kw.items() if key not in static}
    sinks = kw.pop("sinks", None)  # differentiated, the other keywords are not

    def f(attn, q, k, v, bias, mask, sinks, kw):
        extra = {} if sinks is None else dict(sinks=sinks)
        return attn(q, k, v, bias, mask, return_residual=True, **kw, **extra, **static)

    def loss_of(attn):
        def loss(q, k, v, bias, mask, sinks, kw):
            out, lse = f(attn, q, k, v, bias, mask, sinks, kw)
            return (jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) * wl),
                    (out, lse))
        return loss

    argnums = tuple(i for i, x in enumerate((q, k, v, bias, None, sinks)) if i < 3
                    or x is not None)
    grad = lambda attn: jax.grad(loss_of(attn), argnums=argnums, has_aux=True)  # noqa: E731
    plain = lambda *a, **k_: jax_mfa.attention(*a, implementation="cpu", **k_)  # noqa: E731
    want_grads, want = jax.jit(grad(plain))(q, k, v, bias, mask, sinks, kw)

    def spec_of(x, roles):
        if x is None:
            return None
        # Roles as in jax_mfa/_sharding.py; "_" and the bias/mask keys ("a")
        # stay whole.
        full = dict(b=B, t=T, s=S, n=N, k=K)
        names = dict(b=b, t=s, s=s, n=h, k=kv_h)
        return P(*(names[r] if r in names and dim == full[r] and dim > 1 else None
                   for r, dim in zip(roles, x.shape)))

    roles = dict(query_seq_lengths="b", key_value_seq_lengths="b", query_segment_ids="bt",
                 key_value_segment_ids="bs")
    specs = (spec_of(q, "btn_"), spec_of(k, "bsk_"), spec_of(v, "bsk_"),
             spec_of(bias, "bnta"), spec_of(mask, "bnta"), spec_of(sinks, "n"))
    kw_specs = {key: spec_of(val, roles[key]) for key, val in kw.items()}
    put = lambda x, sp: x if x is None else jax.device_put(x, NamedSharding(mesh, sp))  # noqa
    tol = TOLERANCE[jnp.dtype(q.dtype).name]
    if case.get("uneven"):
        # device_put refuses uneven shards: shard inside jit instead.
        def sharded(*a, **k_):
            a = [x if x is None else jax.lax.with_sharding_constraint(
                x, NamedSharding(mesh, sp)) for x, sp in zip(a, specs)]
            return plain(*a, **k_)
        args = [put(x, P()) for x in (q, k, v, bias, mask, sinks)]
        kw_sharded = {key: put(val, P()) for key, val in kw.items()}
        results = {"jit": jax.jit(grad(sharded))(*args, kw_sharded)}
        s = None  # shard_map needs even blocks
    else:
        args = [put(x, sp) for x, sp in zip((q, k, v, bias, mask, sinks), specs)]
        kw_sharded = {key: put(val, kw_specs[key]) for key, val in kw.items()}
        results = {"jit": jax.jit(grad(plain))(*args, kw_sharded)}
    if s is not None and case.get("shard_map", True):
        results["shard_map"] = ring_under_shard_map(
            mesh, grad, args, specs, kw_sharded, kw_specs,
            dict(static, implementation=case.get("ring_implementation", "cpu")))
    for path, (grads, (out, lse)) in results.items():
        errs = [relative_error(out, want[0]), relative_error(lse, want[1])]
        errs += [relative_error(g, g0) for g, g0 in zip(grads, want_grads)]
        worst = max(errs)
        print(f"CASE {name} {path} {worst:.3g}", flush=True)
        assert worst <= tol, (name, path, errs)


def ring_under_shard_map(mesh, grad, args, specs, arrays, array_specs, static):
    """The same computation through jax_mfa.ring_attention inside shard_map:
    every array goes in with the spec of its blocks (bias/mask: this device's
    query rows against all keys)."""
    q_spec = specs[0]
    present = [i for i, x in enumerate(args) if x is not None]
    names = list(arrays)

    def ring(*a):
        full = [None] * 6
        for i, x in zip(present, a):
            full[i] = x
        keywords = dict(zip(names, a[len(present):]))
        if full[5] is not None:
            keywords["sinks"] = full[5]
        return jax_mfa.ring_attention(*full[:5], axis_name="s", return_residual=True,
                                      **static, **keywords)

    smap = jax.shard_map(ring, mesh=mesh,
                         in_specs=tuple(specs[i] for i in present)
                         + tuple(array_specs[key] for key in names),
                         out_specs=(q_spec, P(*tuple(q_spec)[:3])))

    def attn(q, k, v, bias, mask, return_residual, sinks=None, **k_):
        a = [x for x in (q, k, v, bias, mask, sinks) if x is not None]
        return smap(*a, *(k_[key] for key in names))

    return jax.jit(grad(attn))(*args, arrays)


def main():
    kind, names = sys.argv[1], sys.argv[2:]
    n = len(jax.devices())
    mesh = mesh_for(kind, n)
    rng = np.random.default_rng(n * 100 + len(kind))
    for name, case in cases(kind, n).items():
        if not names or name in names:
            start = time.perf_counter()
            run_case(mesh, name, case, rng)
            print(f"TIME {name} {time.perf_counter() - start:.1f} s", flush=True)
    print("ALL OK")


if __name__ == "__main__":
    main()

"""Which construct of ring attention makes XLA crash while compiling?

    python3 benchmarks/probe_ring_compile.py            # every variant, in parallel
    python3 benchmarks/probe_ring_compile.py --only=A,B  # some
    python3 benchmarks/probe_ring_compile.py VARIANT    # one, in this process

On jax 0.11.2, jax_mfa.ring_attention under shard_map (4 host devices,
float64, causal, GQA, bias, lengths: tests/sharding_cases.py seq
causal_gqa_odd) crashed XLA in backend_compile_and_load. Each variant below
changes one thing of that call (or of the ring's code, patched in the child
process) and only compiles it, each in its own subprocess (a segfault ends
only that one). Prints one line per variant: ok, CRASH (signal) or ERROR (last
line of the traceback), and "ALL DONE".

Found (jax 0.11.2, 16-core Xeon, 2026-11-22): every shard_map variant of the
ring crashed, the jit path did not; the pieces alone (ppermute, fori_loop,
casts, the kernels) compiled; the crash is `zeros.at[:, 0:rows].set(x)` (and
`.add`) whose update covers the whole operand (mini_at_set_full,
mini_at_add_full), inside shard_map. The ring avoids it (it updates only whole
per-chunk arrays; before, _ring._update_rows replaced such updates). The ring
variants here ran before that fix.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

DEVICES = 4
BASE = dict(mode="grad", zigzag=True, loop="fori", cond="cond", impl="cpu", bias=True,
            lengths=True, x64=True, causal=True)
VARIANTS = {
    "baseline": {},
    "forward_only": dict(mode="fwd"),
    "jit_sharded_inputs": dict(mode="jit"),
    "no_zigzag": dict(zigzag=False),
    "unrolled_loop": dict(loop="unroll"),
    "select_not_cond": dict(cond="select"),
    "unrolled_and_select": dict(loop="unroll", cond="select"),
    "xla_kernels": dict(impl="xla"),
    "no_bias_no_lengths": dict(bias=False, lengths=False),
    "float32": dict(x64=False),
    "not_causal": dict(causal=False),
    "xla_kernels_forward_only": dict(impl="xla", mode="fwd"),
    "blockwise_explicit_batch": dict(mode="blockwise_explicit_batch"),
    # The simplest ring: float32, plain-JAX kernels, forward, nothing optional.
    "simplest_ring": dict(x64=False, impl="xla", mode="fwd", bias=False, lengths=False,
                          causal=False),
    "simplest_ring_check_vma_off": dict(x64=False, impl="xla", mode="fwd", bias=False,
                                        lengths=False, causal=False, check_vma=False),
    "mini_no_jax_mfa_import": dict(x64=False, mode="mini", mini="ppermute", no_import=True),
    # _ring.forward called directly (no custom_vjp), with and without the casts.
    "ring_forward_direct": dict(x64=False, mode="mini", mini="ring_forward"),
    "ring_forward_direct_no_casts": dict(x64=False, mode="mini", mini="ring_forward_no_casts",
                                         check_vma=False),
    # That forward with one part taken out.
    "ring_trivial_kernels": dict(x64=False, mode="mini", mini="ring_forward", patch="kernel"),
    "ring_own_block_only": dict(x64=False, mode="mini", mini="ring_forward", patch="step0"),
    "ring_no_ppermute": dict(x64=False, mode="mini", mini="ring_forward", patch="shift"),
    "ring_no_merge": dict(x64=False, mode="mini", mini="ring_forward", patch="merge"),
    "ring_trivial_kernels_no_merge": dict(x64=False, mode="mini", mini="ring_forward",
                                          patch="kernel,merge"),
    "xla_kernel_lengths_alone": dict(x64=False, mode="mini", mini="kernel_lengths"),
}
# Pieces of the ring alone under shard_map (float32), the last three what the
# variants narrowed it to: an update covering its whole operand
# (x.at[:, 0:rows].set) crashes, a partial one does not.
MINI = ("ppermute", "ppermute_fori", "axis_index", "pcast", "attention_cpu", "attention_xla",
        "custom_vjp", "pcast_bool", "pcast_int", "fori_tuple_state", "fori_index_math",
        "fori_zeros_state", "at_set_full", "at_add_full", "at_set_part")
VARIANTS.update({f"mini_{m}": dict(x64=False, mode="mini", mini=m) for m in MINI})


def mini(config):
    """One piece of the ring alone under shard_map over 4 devices."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    n = DEVICES
    mesh = jax.make_mesh((n,), ("s",), axis_types=(AxisType.Auto,))
    perm = [(i, (i + 1) % n) for i in range(n)]
    x = jax.device_put(jnp.ones((2, 4 * n, 4, 8), jnp.float32),
                       NamedSharding(mesh, P(None, "s")))
    y = jnp.ones((2, 4, 4, 8), jnp.float32)  # replicated

    def body(x, y):
        kind = config["mini"]
        if kind == "ppermute":
            return jax.lax.ppermute(x, "s", perm)
        if kind == "ppermute_fori":
            return jax.lax.fori_loop(1, n, lambda i, c: jax.lax.ppermute(c, "s", perm), x)
        if kind == "axis_index":
            return x * jax.lax.axis_index("s")
        if kind == "pcast":
            return x + jax.lax.pcast(y, ("s",), to="varying")
        if kind in ("attention_cpu", "attention_xla"):
            import jax_mfa
            return jax_mfa.attention(x, x, x, implementation=kind.split("_")[1])
        if kind == "pcast_bool":
            m = jax.lax.pcast(jnp.ones((1, 1, 1, 1), bool), ("s",), to="varying")
            return jnp.where(m, x, 0)
        if kind == "pcast_int":
            i = jax.lax.pcast(jnp.ones((2,), jnp.int32), ("s",), to="varying")
            return x * i[:, None, None, None]
        if kind == "fori_tuple_state":
            def step(i, c):
                (a, b), acc = c
                a, b = jax.lax.ppermute((a, b), "s", perm)
                return (a, b), acc + jnp.einsum("btnh,bsnh->btn", x, a)[..., None] * b
            return jax.lax.fori_loop(1, n, step, ((x, x), x))[1]
        if kind == "fori_index_math":
            def step(s_, c):
                j = (jax.lax.axis_index("s") - s_) % n
                lim = jnp.clip(jnp.full((2,), 4 * n, jnp.int32) - j * 4, 0, 4)
                return jax.lax.ppermute(c, "s", perm) * lim[:, None, None, None]
            return jax.lax.fori_loop(1, n, step, x)
        if kind == "fori_zeros_state":
            z = jax.lax.pcast(jnp.zeros(x.shape), ("s",), to="varying")
            l0 = jax.lax.pcast(jnp.full(x.shape[:3], -jnp.inf), ("s",), to="varying")
            def step(i, c):
                k, (o, l) = c
                k = jax.lax.ppermute(k, "s", perm)
                part = jnp.sum(x * k, -1)
                new = jnp.logaddexp(l, part)
                return k, (o * jnp.exp(l - new)[..., None] + k, new)
            return jax.lax.fori_loop(0, n, step, (x, (z, l0)))[1][0]
        if kind == "at_set_full":
            return jnp.zeros(x.shape).at[:, 0:4].set(x)
        if kind == "at_add_full":
            return jnp.zeros(x.shape).at[:, 0:4].add(x)
        if kind == "at_set_part":
            return jnp.zeros(x.shape).at[:, 0:2].set(x[:, :2])
        if kind == "kernel_lengths":
            from jax_mfa import _api, _xla
            impl, _, ops, options, _ = _api._setup(
                x, x, x, None, None, None, jnp.full((2,), 3, jnp.int32) *
                jax.lax.axis_index("s"), scale=None, is_causal=False, local_window_size=None,
                softcap=None, implementation="xla")
            return _xla.attention(ops, options)[0]
        if kind.startswith("ring_forward"):
            from jax_mfa import _api, _ring
            from jax_mfa._arguments import Operands
            patch = config.get("patch", "")
            if "step0" in patch:
                _ring._around = lambda ring, step, vis, st: step(0, vis, st)
            if "shift" in patch:
                _ring._shift = lambda ring, tree: tree
            if "merge" in patch:
                _ring.merge = lambda o, l, po, pl: (o + po.astype(o.dtype), l + pl)
            if "kernel" in patch:
                _api._kernels = lambda impl: _ring.Kernels(
                    lambda options, q, k, *a: (q * jnp.sum(k), jnp.sum(q, -1)), None)
            impl, _, ops, options, _ = _api._setup(x, x, x, None, None, None, None,
                                                   scale=None, is_causal=False,
                                                   local_window_size=None, softcap=None,
                                                   implementation="xla", key_columns=4 * n)
            vary = lambda a: a  # noqa: E731
            if kind == "ring_forward":
                ops = Operands(*_api._vary(ops.as_tuple(), ("s",)))
                vary = _api._vary_like(x)
            ring = _ring.Ring.make("s", n, 4, 4, options)
            return _ring.forward(_api._kernels("xla"), ring, options, ops, vary)[0]
        if kind == "custom_vjp":
            @jax.custom_vjp
            def f(a):
                return jax.lax.ppermute(a, "s", perm)
            f.defvjp(lambda a: (f(a), None),
                     lambda _, g: (jax.lax.ppermute(g, "s", [(j, i) for i, j in perm]),))
            return f(x)
        raise ValueError(kind)

    smap = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "s"), P()), out_specs=P(None, "s"),
                         check_vma=config.get("check_vma", True))
    jax.jit(smap).lower(x, y).compile()


def child(config):
    import jax
    jax.config.update("jax_enable_x64", config["x64"])
    if config["mode"] == "mini" and config.get("no_import"):
        return mini(config)
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_mfa
    from jax_mfa import _ring

    if config["mode"] == "mini":
        return mini(config)

    if not config["zigzag"]:
        make = _ring.Ring.make.__func__

        def no_zigzag(cls, *a, **k):
            import dataclasses
            return dataclasses.replace(make(cls, *a, **k), zigzag=False)
        _ring.Ring.make = classmethod(no_zigzag)
    if config["loop"] == "unroll":
        def around(ring, step, visiting, state):
            visiting, state = step(0, visiting, state)
            for s in range(1, ring.size):
                visiting, state = step(s, _ring._shift(ring, visiting), state)
            return visiting, state
        _ring._around = around
    if config["cond"] == "select":
        def select(pred, a, b, *ops):
            return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a(*ops), b(*ops))
        jax.lax.cond = select

    dtype = jnp.float64 if config["x64"] else jnp.float32
    n = DEVICES
    B, L, N, K, H = 2, 5 * n, 4, 1, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (B, L, N, H), dtype)
    k = jax.random.normal(keys[1], (B, L, K, H), dtype)
    v = jax.random.normal(keys[2], (B, L, K, H), dtype)
    bias = jax.random.normal(keys[3], (B, 1, L, L), dtype) if config["bias"] else None
    lengths = jnp.full((B,), L - 3, jnp.int32) if config["lengths"] else None

    if config["mode"] == "blockwise_explicit_batch":
        mesh = jax.make_mesh((n,), ("b",), axis_types=(AxisType.Explicit,))
        qb = jax.random.normal(keys[0], (n, L, N, H), dtype)
        kb = jax.random.normal(keys[1], (n, L, K, H), dtype)
        put = lambda x: jax.device_put(x, NamedSharding(mesh, P("b")))  # noqa: E731
        f = lambda q, k, v: jnp.sum(jax_mfa.attention(  # noqa: E731
            q, k, v, is_causal=True, implementation="xla-blockwise"))
        jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(put(qb), put(kb), put(kb)).compile()
        return

    mesh = jax.make_mesh((n,), ("s",), axis_types=(AxisType.Auto,))
    kw = dict(is_causal=config["causal"], implementation=config["impl"])
    if lengths is not None:
        kw.update(query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    seq, rows = P(None, "s"), P(None, None, "s")
    put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))  # noqa: E731
    args = [put(q, seq), put(k, seq), put(v, seq)] + ([put(bias, rows)] if bias is not None
                                                       else [])

    if config["mode"] == "jit":
        def attn(q, k, v, *b):
            return jax_mfa.attention(q, k, v, *b, **kw)
    else:
        def local(q, k, v, *b):
            return jax_mfa.ring_attention(q, k, v, *b, axis_name="s", **kw)
        attn = jax.shard_map(local, mesh=mesh, in_specs=(seq,) * 3 + (rows,) * len(args[3:]),
                             out_specs=seq, check_vma=config.get("check_vma", True))
    if config["mode"] == "fwd":
        jax.jit(attn).lower(*args).compile()
    else:
        loss = lambda *a: jnp.sum(attn(*a))  # noqa: E731
        jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))).lower(*args).compile()


def run_variant(name):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={DEVICES}").strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", __file__, name],
                           capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        return name, "TIMEOUT", ""
    if r.returncode == 0:
        return name, "ok", ""
    if r.returncode < 0:
        return name, f"CRASH (signal {-r.returncode})", r.stderr[-1500:]
    last = [line for line in r.stderr.splitlines() if line.strip()][-1:] or [""]
    return name, "ERROR", last[0][:300] + "\n" + r.stderr[-2500:]


def main():
    names = list(VARIANTS)
    if len(sys.argv) > 1 and sys.argv[1].startswith("--only="):
        names = sys.argv[1][len("--only="):].split(",")
    elif len(sys.argv) > 1:
        child(dict(BASE, **VARIANTS[sys.argv[1]]))
        return
    import jax
    print("jax", jax.__version__, flush=True)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(run_variant, names))
    for name, verdict, _ in results:
        print(f"{name:28s} {verdict}")
    for name, verdict, detail in results:
        if verdict != "ok":
            print(f"\n==== {name}: {verdict}\n{detail}")
    print("ALL DONE")


if __name__ == "__main__":
    main()

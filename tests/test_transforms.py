"""jax_mfa.attention under JAX transformations: numerical gradient checks, jit,
grad, vmap (against Python loops, forward and gradients), and agreement with
the "xla" implementation and with jax.nn.dot_product_attention. Sharded inputs
are tested in test_sharding.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_mfa
import reference
from support import (FLOAT64_IMPLEMENTATIONS, FUSED, IMPLEMENTATIONS, dtype_for, random_array,
                      relative_error, same_impl_tolerance, to64)


def _inputs(rng, B, T, S, N, K, H, dtype=jnp.float64):
    lead = () if B is None else (B,)
    return (random_array(rng, lead + (T, N, H), dtype), random_array(rng, lead + (S, K, H), dtype),
            random_array(rng, lead + (S, K, H), dtype))


def assert_close(actual, expected, tol, what=""):
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def assert_tree_close(actual, expected, tol, what=""):
    la, le = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(la) == len(le)
    for i, (a, e) in enumerate(zip(la, le)):
        assert np.shape(a) == np.shape(e), (what, i, np.shape(a), np.shape(e))
        assert_close(a, e, tol, f"{what}[{i}]")


# ----------------------------------------------------------------------------
# Numerical gradient checks (float64)

GRAD_CASES = {
    "plain": dict(),
    "causal_bias": dict(is_causal=True, bias=(2, 1, 9, 11)),
    "lengths_softcap": dict(softcap=1.5, query_seq_lengths=(9, 5),
                            key_value_seq_lengths=(4, 11), bias=(9, 11)),
    "everything": dict(is_causal=True, local_window_size=(3, 1), softcap=2.0, bias=(2, 4, 9, 11),
                       mask=True, query_seq_lengths=(7, 0), key_value_seq_lengths=(11, 6)),
}


# float64 only: Metal's float32 is too coarse for finite differences (its
# gradients are checked against the float64 reference in test_attention.py).
@pytest.mark.parametrize("impl", FLOAT64_IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_check_grads(name, impl, rng):
    opts = dict(GRAD_CASES[name])
    q, k, v = _inputs(rng, 2, 9, 11, 4, 2, 5)
    bias_shape = opts.pop("bias", None)
    bias = None if bias_shape is None else random_array(rng, bias_shape, jnp.float64)
    mask = None
    if opts.pop("mask", False):
        mask = jnp.asarray(rng.random((2, 1, 9, 11)) < 0.7)
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in opts:
            opts[key] = jnp.asarray(opts[key], jnp.int32)

    def f(q, k, v, *b):
        out, lse = jax_mfa.attention(q, k, v, b[0] if b else None, mask, return_residual=True,
                                     implementation=impl, **opts)
        # Empty rows have lse = -inf (constant): compare a finite stand-in.
        return out, jnp.where(jnp.isfinite(lse), lse, 0.0)

    args = (q, k, v) if bias is None else (q, k, v, bias)
    check_grads(f, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------
# jit and grad


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_jit_and_grad(impl, rng):
    q, k, v = _inputs(rng, 2, 37, 65, 4, 2, 16, jnp.float32)
    bias = random_array(rng, (1, 4, 37, 65), jnp.float32)
    w = random_array(rng, q.shape, jnp.float32)

    def f(q, k, v, bias, implementation=impl):
        return jax_mfa.attention(q, k, v, bias, is_causal=True, local_window_size=(30, 2),
                                 implementation=implementation)

    eager = f(q, k, v, bias)
    jitted = jax.jit(f)(q, k, v, bias)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))

    loss = lambda *a, **kw: jnp.sum(f(*a, **kw) * w)  # noqa: E731
    g_eager = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    g_jit = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    g_xla = jax.grad(lambda *a: loss(*a, implementation="xla"), argnums=(0, 1, 2, 3))(
        q, k, v, bias)
    assert_tree_close(g_jit, g_eager, 1e-6, "jit(grad) vs grad")
    assert_tree_close(g_eager, g_xla, 2e-5, "grad vs xla grad")
    # value_and_grad, grad of a jitted function, and a second call (cache hit).
    val, g2 = jax.value_and_grad(jax.jit(loss), argnums=0)(q, k, v, bias)
    assert_close(val, loss(q, k, v, bias), 1e-6, "value")
    assert_close(g2, g_eager[0], 1e-6, "grad of jit")


# ----------------------------------------------------------------------------
# vmap against Python loops

V = 3  # vmap size
B0, T0, S0, N0, K0, H0 = 2, 9, 13, 4, 2, 8


def _batched(rng, shape, axis, dtype=jnp.float64):
    if axis is None:
        return random_array(rng, shape, dtype)
    shape = list(shape)
    shape.insert(axis, V)
    return random_array(rng, tuple(shape), dtype)


def _take(x, axis, i):
    return x if axis is None or x is None else jnp.take(x, i, axis=axis)


# Each case: in_axes of (q, k, v, bias, mask, q_lengths, kv_lengths) and options.
VMAP_CASES = {
    "q_only": dict(axes=(0, None, None, None, None, None, None), bias=(B0, N0, T0, S0),
                   opts=dict(is_causal=True)),
    "kv_only": dict(axes=(None, 0, 0, None, None, None, None), bias=(1, N0, T0, S0)),
    "bias_only": dict(axes=(None, None, None, 0, None, None, None), bias=(B0, 1, 1, S0),
                      opts=dict(softcap=3.0)),
    "bias_batched_q_unbatched_broadcast": dict(axes=(None, 0, 0, 0, None, None, None),
                                               bias=(T0, S0)),
    "mask_batched": dict(axes=(0, None, None, None, 0, None, None), bias=(N0, T0, S0),
                         mask=(B0, 1, T0, S0)),
    "lengths_batched": dict(axes=(None, None, None, None, None, 0, 0), bias=(B0, N0, T0, 1),
                            lengths=True),
    "lengths_and_q": dict(axes=(0, 0, 0, None, None, 0, None), lengths=True,
                          opts=dict(local_window_size=(2, 3))),
    "axes_1_2": dict(axes=(1, 2, 2, 3, 1, None, None), bias=(B0, N0, T0, S0),
                     mask=(B0, N0, T0, S0)),
    "all_batched_axis_last": dict(axes=(4, 4, 4, 4, 4, 0, 0), bias=(B0, N0, T0, S0),
                                  mask=(1, 1, T0, S0), lengths=True,
                                  opts=dict(is_causal=True)),
}


def _vmap_setup(rng, case, dtype):
    axes = case["axes"]
    q = _batched(rng, (B0, T0, N0, H0), axes[0], dtype)
    k = _batched(rng, (B0, S0, K0, H0), axes[1], dtype)
    v = _batched(rng, (B0, S0, K0, H0), axes[2], dtype)
    bias = None if "bias" not in case else _batched(rng, case["bias"], axes[3], dtype)
    mask = None
    if "mask" in case:
        shape = list(case["mask"])
        if axes[4] is not None:
            shape.insert(axes[4], V)
        m = rng.random(shape) < 0.7
        m[..., 0, :] = False  # one fully masked row
        mask = jnp.asarray(m)
    ql = kl = None
    if case.get("lengths"):
        ql = jnp.asarray(rng.integers(0, T0 + 1, (V, B0) if axes[5] is not None else (B0,)),
                         jnp.int32)
        kl = jnp.asarray(rng.integers(0, S0 + 1, (V, B0) if axes[6] is not None else (B0,)),
                         jnp.int32)
    return [q, k, v, bias, mask, ql, kl]


# The batching rules are the fused primitives'; the blockwise implementation
# (batched by JAX itself) runs two cases.
@pytest.mark.parametrize("name, impl", [(n, i) for n in VMAP_CASES for i in FUSED] + [
    (n, i) for n in ("q_only", "all_batched_axis_last") for i in IMPLEMENTATIONS
    if i not in FUSED])
def test_vmap(name, impl, rng):
    case = VMAP_CASES[name]
    axes = list(case["axes"])
    dtype, tol = dtype_for(impl), same_impl_tolerance(impl)
    args = _vmap_setup(rng, case, dtype)
    opts = case.get("opts", {})
    for i, a in enumerate(args):
        if a is None:
            axes[i] = None
    w = random_array(rng, (V, B0, T0, N0, H0), dtype)
    wl = random_array(rng, (V, B0, T0, N0), dtype)

    def f(q, k, v, bias, mask, ql, kl):
        out, lse = jax_mfa.attention(q, k, v, bias, mask, query_seq_lengths=ql,
                                     key_value_seq_lengths=kl, return_residual=True,
                                     implementation=impl, **opts)
        return out, lse

    def example(i, a):
        return [_take(x, ax, i) for x, ax in zip(a, axes)]

    # Forward.
    out, lse = jax.vmap(f, in_axes=tuple(axes))(*args)
    loop = [f(*example(i, args)) for i in range(V)]
    assert_close(out, jnp.stack([o for o, _ in loop]), tol, "vmap out")
    assert_close(lse, jnp.stack([l_ for _, l_ in loop]), tol, "vmap lse")

    # Differentiable arguments: q, k, v and bias (when present).
    diff = [i for i in range(4) if args[i] is not None]

    def loss(wi, wli, *a):
        out, lse = f(*a)
        return jnp.sum(out * wi) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * wli)

    def loss_at(dargs, wi, wli, a):
        a = list(a)
        for j, d in zip(diff, dargs):
            a[j] = d
        return loss(wi, wli, *a)

    # vmap(grad): per-example gradients, also for unbatched arguments (e.g. the
    # bias when only q is batched: each example gets its own bias gradient).
    def per_example(wi, wli, *a):
        return jax.grad(loss_at)([a[j] for j in diff], wi, wli, a)

    g_vmap = jax.vmap(per_example, in_axes=(0, 0) + tuple(axes))(w, wl, *args)
    g_loop = [per_example(w[i], wl[i], *example(i, args)) for i in range(V)]
    for j, g in enumerate(g_vmap):
        assert_close(g, jnp.stack([gl[j] for gl in g_loop]), tol, f"vmap(grad) arg {diff[j]}")

    # grad(vmap): unbatched arguments get the sum over examples.
    def vmapped_loss(dargs):
        a = list(args)
        for j, d in zip(diff, dargs):
            a[j] = d
        return jnp.sum(jax.vmap(loss, in_axes=(0, 0) + tuple(axes))(w, wl, *a))

    def looped_loss(dargs):
        a = list(args)
        for j, d in zip(diff, dargs):
            a[j] = d
        return sum(loss(w[i], wl[i], *example(i, a)) for i in range(V))

    dargs = [args[j] for j in diff]
    assert_tree_close(jax.grad(vmapped_loss)(dargs), jax.grad(looped_loss)(dargs), tol,
                      "grad(vmap)")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_nested_vmap(impl, rng):
    """vmap over q (outer) and over k/v and bias (inner), with 3-D inputs."""
    dtype = dtype_for(impl)
    q = random_array(rng, (2, T0, N0, H0), dtype)  # outer axis 0
    k = random_array(rng, (S0, 3, K0, H0), dtype)  # inner axis 1
    v = random_array(rng, (S0, 3, K0, H0), dtype)
    bias = random_array(rng, (3, N0, T0, S0), dtype)  # inner axis 0
    kl = jnp.asarray([S0, 4, 0], jnp.int32)  # inner

    def f(q, k, v, bias, kl):  # 3-D inputs
        return jax_mfa.attention(q, k, v, bias, key_value_seq_lengths=kl, is_causal=True,
                                 implementation=impl)

    inner = jax.vmap(f, in_axes=(None, 1, 1, 0, 0))
    nested = jax.vmap(inner, in_axes=(0, None, None, None, None))
    out = nested(q, k, v, bias, kl)
    assert out.shape == (2, 3, T0, N0, H0)
    for a in range(2):
        for b in range(3):
            assert_close(out[a, b], f(q[a], k[:, b], v[:, b], bias[b], kl[b]),
                         same_impl_tolerance(impl), f"nested [{a},{b}]")

    def loss(q, k, v, bias):
        return jnp.sum(jnp.sin(nested(q, k, v, bias, kl)))

    def loop_loss(q, k, v, bias):
        return sum(jnp.sum(jnp.sin(f(q[a], k[:, b], v[:, b], bias[b], kl[b])))
                   for a in range(2) for b in range(3))

    assert_tree_close(jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias),
                      jax.grad(loop_loss, argnums=(0, 1, 2, 3))(q, k, v, bias),
                      same_impl_tolerance(impl), "grad(nested vmap)")


# ----------------------------------------------------------------------------
# Batching of the backward pass when only some inputs of the vjp are batched:
# any subset of the primals (q, k, v, bias) and of the cotangents (dout, dlse),
# including the cotangents alone (jax.jacrev, vmap over a vjp function).

PRIMAL_BATCHING = {"none": (), "q": (0,), "kv": (1, 2), "bias": (3,), "all": (0, 1, 2, 3)}
COTANGENT_BATCHING = {"none": (), "dout": (4,), "dlse": (5,), "both": (4, 5)}
BATCHING_COMBINATIONS = [(p, c) for p in PRIMAL_BATCHING for c in COTANGENT_BATCHING
                         if PRIMAL_BATCHING[p] + COTANGENT_BATCHING[c]]


def _vjp_everything(impl, mask, kl):
    """(q, k, v, bias, dout, dlse) -> (out, lse, dq, dk, dv, dbias)."""

    def run(q, k, v, bias, dout, dlse):
        def f(q, k, v, bias):
            return jax_mfa.attention(q, k, v, bias, mask, key_value_seq_lengths=kl,
                                     is_causal=True, return_residual=True,
                                     implementation=impl)

        (out, lse), pull = jax.vjp(f, q, k, v, bias)
        return (out, lse, *pull((dout, dlse)))

    return run


@pytest.mark.parametrize("primal, cotangent, impl", [
    (p, c, i) for p, c in BATCHING_COMBINATIONS for i in FUSED] + [
    ("none", "both", i) for i in IMPLEMENTATIONS if i not in FUSED])
def test_vmap_of_vjp(primal, cotangent, impl, rng):
    dtype = dtype_for(impl)
    batched = PRIMAL_BATCHING[primal] + COTANGENT_BATCHING[cotangent]
    axes = tuple(0 if i in batched else None for i in range(6))
    shapes = [(B0, T0, N0, H0), (B0, S0, K0, H0), (B0, S0, K0, H0), (1, N0, T0, S0),
              (B0, T0, N0, H0), (B0, T0, N0)]
    args = [random_array(rng, ((V,) if ax == 0 else ()) + shape, dtype)
            for shape, ax in zip(shapes, axes)]
    mask = jnp.asarray(rng.random((B0, 1, T0, S0)) < 0.8)
    kl = jnp.asarray([S0, 0], jnp.int32)  # batch row 1: no key, lse -inf, zero gradients
    run = _vjp_everything(impl, mask, kl)
    got = jax.vmap(run, in_axes=axes)(*args)
    loop = [run(*[a[i] if ax == 0 else a for a, ax in zip(args, axes)]) for i in range(V)]
    want = [jnp.stack([r[j] for r in loop]) for j in range(6)]
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dbias"), got, want):
        assert_close(g, w, same_impl_tolerance(impl), f"vmap(vjp) {name}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_jacrev(impl, rng):
    """The issue's repro (jacrev batches the cotangent only), against the
    Jacobian of the xla implementation."""
    dtype = dtype_for(impl)
    q, k, v = _inputs(rng, 1, 3, 5, 2, 1, 4, dtype)
    bias = random_array(rng, (2, 3, 5), dtype)

    def f(impl, q, k, v, bias):
        return jax_mfa.attention(q, k, v, bias, is_causal=True, return_residual=True,
                                 implementation=impl)

    got = jax.jacrev(functools.partial(f, impl), argnums=(0, 1, 2, 3))(q, k, v, bias)
    want = jax.jacrev(functools.partial(f, "xla"), argnums=(0, 1, 2, 3))(q, k, v, bias)
    assert_tree_close(got, want, 1e-10 if dtype == jnp.float64 else 2e-5, "jacrev")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_of_vjp_function(impl, rng):
    """The issue's other repro: the vjp function itself, vmapped over cotangents."""
    dtype = dtype_for(impl)
    q, k, v = _inputs(rng, 1, 3, 4, 1, 1, 4, dtype)
    out, pull = jax.vjp(lambda a, b: jax_mfa.attention(a, b, v, implementation=impl), q, k)
    cts = random_array(rng, (2,) + out.shape, dtype)
    got = jax.vmap(pull)(cts)
    for i in range(2):
        want = pull(cts[i])
        assert_close(got[0][i], want[0], same_impl_tolerance(impl), "dq")
        assert_close(got[1][i], want[1], same_impl_tolerance(impl), "dk")


# Agreement with the "xla" implementation and with jax.nn.


@pytest.mark.parametrize("impl, dtype", [(i, d) for i in IMPLEMENTATIONS
                                          for d in (jnp.float32, dtype_for(i))
                                          if d == jnp.float32 or i in FLOAT64_IMPLEMENTATIONS],
                         ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name)
def test_xla_agreement(impl, dtype, rng):
    q, k, v = _inputs(rng, 3, 65, 37, 6, 3, 24, dtype)
    bias = random_array(rng, (3, 1, 65, 37), dtype)
    mask = jnp.asarray(rng.random((65, 37)) < 0.8)
    kw = dict(is_causal=True, local_window_size=(40, 5), softcap=4.0,
              query_seq_lengths=jnp.asarray([65, 30, 0], jnp.int32),
              key_value_seq_lengths=jnp.asarray([37, 0, 20], jnp.int32), return_residual=True)
    w = random_array(rng, q.shape, dtype)

    def run(implementation):
        def loss(q, k, v, bias):
            out, lse = jax_mfa.attention(q, k, v, bias, mask, implementation=implementation, **kw)
            return jnp.sum(out * w) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0)), (out, lse)
        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, bias)

    (g1, (o1, l1)), (g2, (o2, l2)) = run(impl), run("xla")
    tol = 1e-5 if dtype == jnp.float32 else 1e-10
    assert_close(o1, o2, tol, "out")
    assert_close(l1, l2, tol, "lse")
    assert_tree_close(g1, g2, 2 * tol, "grads")


JAX_NN_CASES = {
    "causal": dict(is_causal=True),
    "bias": dict(bias=(2, 4, 37, 65)),
    "mask": dict(mask=(2, 1, 37, 65)),
    "gqa_causal_bias": dict(is_causal=True, bias=(1, 4, 37, 65), K=1),
    "lengths": dict(query_seq_lengths=(37, 20), key_value_seq_lengths=(65, 9)),
    "window": dict(local_window_size=(7, 3)),
    "three_d": dict(batch=None, is_causal=True, bias=(4, 37, 65)),
}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(JAX_NN_CASES))
def test_jax_nn_agreement(name, impl, rng):
    """Same results as jax.nn.dot_product_attention (float32) where no row is
    fully masked; with query lengths only rows below the length are compared."""
    opts = dict(JAX_NN_CASES[name])
    B = opts.pop("batch", 2)
    K = opts.pop("K", 2)
    q, k, v = _inputs(rng, B, 37, 65, 4, K, 32, jnp.float32)
    args = [None, None]
    if "bias" in opts:
        args[0] = random_array(rng, opts.pop("bias"), jnp.float32)
    if "mask" in opts:
        m = rng.random(opts.pop("mask")) < 0.6
        m[..., 0] = True  # every row sees at least key 0
        args[1] = jnp.asarray(m)
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in opts:
            opts[key] = jnp.asarray(opts[key], jnp.int32)
    w = random_array(rng, q.shape, jnp.float32)
    valid = np.ones(q.shape[:-1], bool)
    if "query_seq_lengths" in opts:
        valid = np.arange(37)[None, :, None] < np.asarray(opts["query_seq_lengths"])[:, None,
                                                                                    None]
        valid = np.broadcast_to(valid, q.shape[:-1])
    wv = w * jnp.asarray(valid[..., None], jnp.float32)

    def run(fn):
        def loss(q, k, v, *b):
            out = fn(q, k, v, b[0] if b else None, args[1], **opts)
            return jnp.sum(out * wv), out
        diff = (q, k, v) if args[0] is None else (q, k, v, args[0])
        return jax.grad(loss, argnums=tuple(range(len(diff))), has_aux=True)(*diff)

    g1, o1 = run(lambda *a, **kw: jax_mfa.attention(*a, implementation=impl, **kw))
    g2, o2 = run(jax.nn.dot_product_attention)
    assert_close(np.asarray(o1)[valid], np.asarray(o2)[valid], 1e-5, "out")
    assert_tree_close(g1, g2, 2e-5, "grads")


# ----------------------------------------------------------------------------
# Forward mode and second derivatives: a clear error naming jax_mfa.


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_mode_error_names_jax_mfa(impl, rng):
    q, k, v = _inputs(rng, 1, 5, 4, 2, 1, 4, dtype_for(impl))

    def f(q):
        return jnp.sum(jax_mfa.attention(q, k, v, is_causal=True, implementation=impl))

    transforms = {"jvp": lambda: jax.jvp(f, (q,), (q,)), "jacfwd": lambda: jax.jacfwd(f)(q)}
    if impl in FUSED:  # the blockwise backward is plain JAX: JAX may differentiate it
        transforms["hessian"] = lambda: jax.hessian(f)(q)
        transforms["grad_of_grad"] = lambda: jax.grad(lambda a: jnp.sum(jax.grad(f)(a)))(q)
    for name, run in transforms.items():
        with pytest.raises(NotImplementedError,
                           match=r"jax_mfa\.attention.*implementation=\"xla\""):
            run()
    if impl == IMPLEMENTATIONS[0]:  # the suggested implementation does support them
        jax.hessian(lambda a: jnp.sum(jax_mfa.attention(a, k, v, implementation="xla")))(q)

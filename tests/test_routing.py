"""implementation=None under a GPU/TPU platform: jax.nn.dot_product_attention
wherever it computes jax_mfa's semantics (cuDNN on NVIDIA GPUs), else the
"xla" path for small problems and the blockwise one for large ones. Simulated
here by reporting a "gpu" default platform (cuDNN is then unavailable and
jax.nn's XLA path is taken); benchmarks/bench_gpu.py checks the real thing.
Every route must give exactly the semantics of implementation="xla", fully
masked rows (0, zero gradients) included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
from jax_mfa import _api, _jax_nn
from support import random_array, relative_error

B, T, S, N, K, H = 2, 21, 17, 4, 2, 8


@pytest.fixture
def gpu_platform(monkeypatch):
    monkeypatch.setattr(_api, "default_platform", lambda: "gpu")


def _problem(rng, case):
    q = random_array(rng, (B, T, N, H), jnp.float32)
    k = random_array(rng, (B, S, K, H), jnp.float32)
    v = random_array(rng, (B, S, K, H), jnp.float32)
    kw = dict(case)
    if kw.pop("mask", False):
        m = rng.random((B, 1, T, S)) < 0.6
        m[0, :, 3] = False  # an empty row
        kw["mask"] = jnp.asarray(m)
    if kw.pop("bias", False):
        kw["bias"] = random_array(rng, (1, N, T, S), jnp.float32)
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kw:
            kw[name] = jnp.asarray(kw[name], jnp.int32)
    return (q, k, v), kw


CASES = {
    # name: (options, expected route)
    "plain_causal": (dict(is_causal=True), "jax.nn (xla)"),
    "mask_with_empty_row": (dict(mask=True), "jax.nn (xla)"),
    "lengths_with_empty_rows": (dict(query_seq_lengths=(T, 5), key_value_seq_lengths=(0, S)),
                                "jax.nn (xla)"),
    "window_with_empty_rows": (dict(local_window_size=(2, 1)), "jax.nn (xla)"),  # T > S + 2
    "everything_jax_nn_has": (dict(mask=True, is_causal=True, local_window_size=(6, 0),
                                   key_value_seq_lengths=(9, 0)), "jax.nn (xla)"),
    "softcap": (dict(softcap=2.0, is_causal=True), "xla"),
    "bias": (dict(bias=True), "xla"),
    "residual": (dict(return_residual=True, mask=True), "xla"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_route_and_semantics(name, gpu_platform, rng):
    case, route = CASES[name]
    (q, k, v), kw = _problem(rng, case)
    residual = kw.get("return_residual", False)
    w = random_array(rng, q.shape, jnp.float32)

    def run(implementation):
        def loss(q, k, v):
            res = jax_mfa.attention(q, k, v, implementation=implementation, **kw)
            out = res[0] if residual else res
            extra = jnp.sum(jnp.where(jnp.isfinite(res[1]), res[1], 0)) if residual else 0
            return jnp.sum(out * w) + extra, res
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    _api.last_route = None
    grads, res = run(None)
    assert _api.last_route == route
    want_grads, want = run("xla")
    for got, exp in zip(jax.tree.leaves((res, grads)), jax.tree.leaves((want, want_grads))):
        assert relative_error(got, exp) <= 2e-5
    out = res[0] if residual else res
    if "mask" in kw:  # the empty row is exactly 0 with a zero query gradient
        assert np.all(np.asarray(out)[0, 3] == 0) and np.all(np.asarray(grads[0])[0, 3] == 0)


@pytest.mark.parametrize("case", [dict(is_causal=True), dict(softcap=3.0, mask=True)])
def test_large_problems_go_blockwise(case, gpu_platform, rng, monkeypatch):
    """Above XLA_SCORES_MAX_BYTES of scores (and without cuDNN), the blockwise
    implementation runs instead of anything that stores the T x S scores."""
    monkeypatch.setattr(_jax_nn, "XLA_SCORES_MAX_BYTES", 0)
    (q, k, v), kw = _problem(rng, case)
    got = jax_mfa.attention(q, k, v, **kw)
    assert _api.last_route == "xla-blockwise"
    assert relative_error(got, jax_mfa.attention(q, k, v, implementation="xla", **kw)) <= 1e-5


def test_explicit_implementation_is_kept(gpu_platform, rng):
    (q, k, v), _ = _problem(rng, {})
    _api.last_route = None
    jax_mfa.attention(q, k, v, implementation="xla-blockwise")
    assert _api.last_route is None


def test_bfloat16_route(gpu_platform, rng):
    """Half precision takes the same route (cuDNN is tried first on NVIDIA GPUs)."""
    (q, k, v), kw = _problem(rng, dict(mask=True, is_causal=True))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got = jax_mfa.attention(q, k, v, **kw)
    assert _api.last_route == "jax.nn (xla)" and got.dtype == jnp.bfloat16
    want = jax_mfa.attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla",
                             **kw)
    assert relative_error(got, want) <= 2e-2
    assert np.all(np.asarray(got, np.float32)[0, 3] == 0)

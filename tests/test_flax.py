"""jax_mfa.flax.attention_fn inside flax's attention layers (nnx and linen):
same outputs and parameter gradients as with their default attention."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

flax = pytest.importorskip("flax")
from flax import linen, nnx  # noqa: E402

import jax_mfa.flax  # noqa: E402
from support import random_array, relative_error  # noqa: E402

B, T, F, HEADS = 2, 37, 64, 4
TOL = 1e-5
GRAD_TOL = 2e-5  # whole-layer parameter gradients, both sides in float32


def assert_tree_close(a, b, tol, what):
    """Per leaf: max error relative to max(|leaf|, 1% of the largest leaf).

    The floor matters for the key projection's bias: its gradient is exactly 0
    in exact arithmetic (adding a constant to every key shifts each logit row
    by a constant, which the softmax ignores), so both sides are rounding noise."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and la
    top = max(float(np.max(np.abs(np.asarray(y, np.float64)))) for y in lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        scale = max(float(np.max(np.abs(y))), 0.01 * top, 1e-30)
        err = float(np.max(np.abs(x - y))) / scale
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _mask(kind, rng):
    if kind is None:
        return None
    if kind == "causal":
        return nnx.make_causal_mask(jnp.ones((B, T)))  # (B, 1, T, T) float
    m = rng.random((B, 1, T, T)) < 0.7
    m[..., 0] = True  # no fully masked row (flax averages those, jax_mfa gives 0)
    return jnp.asarray(m)


@pytest.mark.parametrize("mask_kind", [None, "causal", "padding", "is_causal"])
def test_nnx(mask_kind, rng):
    x = random_array(rng, (B, T, F), jnp.float32)
    w = random_array(rng, (B, T, F), jnp.float32)
    mask = None if mask_kind == "is_causal" else _mask(mask_kind, rng)
    kw = dict(is_causal=True) if mask_kind == "is_causal" else {}

    def make(attention_fn):
        kwargs = {} if attention_fn is None else dict(attention_fn=attention_fn)
        return nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, qkv_features=F,
                                      decode=False, rngs=nnx.Rngs(0), **kwargs)

    def loss(model):
        y = model(x, mask=mask, **kw)
        return jnp.sum(y * w), y

    ref_model, mfa_model = make(None), make(jax_mfa.flax.attention_fn)
    (_, y_ref), g_ref = nnx.value_and_grad(loss, has_aux=True)(ref_model)
    (_, y_mfa), g_mfa = nnx.value_and_grad(loss, has_aux=True)(mfa_model)
    assert_tree_close(y_mfa, y_ref, TOL, "nnx output")
    assert_tree_close(nnx.state(g_mfa), nnx.state(g_ref), GRAD_TOL, "nnx parameter gradients")


@pytest.mark.parametrize("mask_kind", [None, "causal", "padding"])
def test_linen(mask_kind, rng):
    x = random_array(rng, (B, T, F), jnp.float32)
    w = random_array(rng, (B, T, F), jnp.float32)
    mask = linen.make_causal_mask(jnp.ones((B, T))) if mask_kind == "causal" else \
        _mask(mask_kind, rng)
    ref = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F)
    mfa = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F,
                                             attention_fn=jax_mfa.flax.attention_fn)
    params = ref.init(jax.random.PRNGKey(0), x, x, mask=mask)

    def loss(module):
        def f(p):
            y = module.apply(p, x, x, mask=mask)
            return jnp.sum(y * w), y
        return jax.value_and_grad(f, has_aux=True)(params)

    (_, y_ref), g_ref = loss(ref)
    (_, y_mfa), g_mfa = loss(mfa)
    assert_tree_close(y_mfa, y_ref, TOL, "linen output")
    assert_tree_close(g_mfa, g_ref, GRAD_TOL, "linen parameter gradients")


def test_linen_cross_attention_multi_batch_dims(rng):
    """Several batch dims (flax allows batch...) and T != S."""
    xq = random_array(rng, (2, 3, 9, F), jnp.float32)
    xkv = random_array(rng, (2, 3, 13, F), jnp.float32)
    mask = jnp.asarray(np.broadcast_to(rng.random((3, 1, 9, 13)) < 0.7, (2, 3, 1, 9, 13)).copy())
    mask = mask.at[..., 0].set(True)
    ref = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F)
    mfa = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F,
                                             attention_fn=jax_mfa.flax.attention_fn)
    params = ref.init(jax.random.PRNGKey(1), xq, xkv, mask=mask)
    assert_tree_close(mfa.apply(params, xq, xkv, mask=mask), ref.apply(params, xq, xkv, mask=mask),
                      TOL, "multi-batch output")


def test_dtype_and_keywords(rng):
    q = random_array(rng, (B, T, HEADS, 16), jnp.float32)
    out = jax_mfa.flax.attention_fn(q, q, q, dtype=jnp.bfloat16, precision=None,
                                    force_fp32_for_softmax=True, qk_attn_weights_einsum=None,
                                    attn_weights_value_einsum=None, einsum_dot_general=None,
                                    dropout_rate=0.1, deterministic=True)
    assert out.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q.astype(jnp.bfloat16).astype(jnp.float32),
                                       q.astype(jnp.bfloat16).astype(jnp.float32),
                                       q.astype(jnp.bfloat16).astype(jnp.float32))
    assert relative_error(out, ref) < 2**-7
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        jax_mfa.flax.attention_fn(q, q, q, bogus=1)
    with pytest.raises(TypeError, match="qk_attn_weights_einsum"):
        jax_mfa.flax.attention_fn(q, q, q, qk_attn_weights_einsum=jnp.einsum)


def _flax_weights_with_our_mask(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                                dropout_rng=None, dropout_rate=0.0, deterministic=False,
                                dtype=None, precision=None, module=None, **kwargs):
    """flax's own attention weights, then the dropout mask of jax_mfa's documented
    generator (jax_mfa._philox, checked against Random123's vectors elsewhere):
    what attention_fn must compute, written with flax's unfused operations."""
    from jax_mfa import _philox

    w = linen.dot_product_attention_weights(query, key, bias, mask, dtype=dtype,
                                            precision=precision, deterministic=True)
    if dropout_rate and not deterministic:
        # Batch dims flattened row-major: the generator's batch index.
        *batch, N, Tw, S = w.shape
        Bw = int(np.prod(batch))
        rows = (jnp.zeros if broadcast_dropout else jnp.arange)(Bw, dtype=jnp.uint32)
        seed = _philox.make_seed(_philox.key_words(dropout_rng), rows)
        keep = _philox.keep_mask(seed, dropout_rate, (Bw, N, Tw, S), broadcast=broadcast_dropout)
        w = w * keep.reshape(w.shape) / (1.0 - dropout_rate)
    return jnp.einsum("...hqk,...khd->...qhd", w, value)


@pytest.mark.parametrize("broadcast_dropout", [True, False])
def test_nnx_dropout(broadcast_dropout, rng):
    """nnx.MultiHeadAttention with dropout in training mode: the fused dropout
    equals flax's weights times the generator's mask, outputs and gradients."""
    x = random_array(rng, (B, T, F), jnp.float32)
    w = random_array(rng, (B, T, F), jnp.float32)

    def make(attention_fn):
        return nnx.MultiHeadAttention(num_heads=HEADS, in_features=F, qkv_features=F,
                                      decode=False, dropout_rate=0.3, rngs=nnx.Rngs(0),
                                      broadcast_dropout=broadcast_dropout,
                                      attention_fn=attention_fn)

    def loss(model):
        y = model(x, deterministic=False)
        return jnp.sum(y * w), y

    ref_model = make(_flax_weights_with_our_mask)
    mfa_model = make(jax_mfa.flax.attention_fn)
    (_, y_ref), g_ref = nnx.value_and_grad(loss, has_aux=True)(ref_model)
    (_, y_mfa), g_mfa = nnx.value_and_grad(loss, has_aux=True)(mfa_model)
    assert_tree_close(y_mfa, y_ref, TOL, "nnx dropout output")
    assert_tree_close(nnx.state(g_mfa), nnx.state(g_ref), GRAD_TOL, "nnx dropout gradients")
    # Dropout did something, and deterministic mode turns it off.
    y_det = mfa_model(x, deterministic=True)
    assert relative_error(y_mfa, y_det) > 0.05
    assert_tree_close(y_det, ref_model(x, deterministic=True), TOL, "nnx deterministic")


def test_linen_dropout_multi_batch_dims(rng):
    """linen with several batch dims and dropout (a legacy uint32 key)."""
    xq = random_array(rng, (2, 3, 9, F), jnp.float32)
    ref = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F, dropout_rate=0.4,
                                             broadcast_dropout=False, deterministic=False,
                                             attention_fn=_flax_weights_with_our_mask)
    mfa = linen.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F, dropout_rate=0.4,
                                             broadcast_dropout=False, deterministic=False,
                                             attention_fn=jax_mfa.flax.attention_fn)
    params = ref.init(jax.random.PRNGKey(1), xq)
    rngs = {"dropout": jax.random.PRNGKey(2)}
    assert_tree_close(mfa.apply(params, xq, rngs=rngs), ref.apply(params, xq, rngs=rngs), TOL,
                      "linen dropout output")


def test_dropout_needs_rng(rng):
    q = random_array(rng, (B, T, HEADS, 16), jnp.float32)
    with pytest.raises(ValueError, match="dropout_rng"):
        jax_mfa.flax.attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)


def test_sow_weights_not_supported(rng):
    q = random_array(rng, (B, T, HEADS, 16), jnp.float32)
    with pytest.raises(NotImplementedError, match="sow"):
        jax_mfa.flax.attention_fn(q, q, q, module=object())


def test_flax_not_imported_by_jax_mfa():
    code = ("import sys, jax_mfa, jax_mfa.flax; "
            "assert 'flax' not in sys.modules, 'flax imported'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]

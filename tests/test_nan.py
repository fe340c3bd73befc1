"""NaN propagates as in jax.nn: an allowed NaN logit makes its query row's
output and logsumexp NaN (and its gradients NaN); a NaN in a key that is masked
out (by mask, lengths, window or causal) stays invisible. Every implementation,
the fused ones and the comparison paths, against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
import reference
from support import ALL_IMPLEMENTATIONS, assert_nan_pattern_and_close, dtype_for, random_array, to64

NAN = float("nan")


def _run(impl, q, k, v, bias=None, mask=None, **kw):
    out, lse = jax_mfa.attention(q, k, v, bias, mask, return_residual=True, implementation=impl,
                                 **kw)
    return to64(out), to64(lse)


def _reference(q, k, v, bias=None, mask=None, **kw):
    kw = {n: (np.asarray(a) if n.endswith("lengths") and a is not None else a)
          for n, a in kw.items()}
    return reference.attention(np, to64(q), to64(k), to64(v),
                               None if bias is None else to64(bias),
                               None if mask is None else np.asarray(mask), **kw)


def _inputs(rng, impl, B=2, T=19, S=23, N=4, K=2, H=8):
    dtype = dtype_for(impl)
    return (random_array(rng, (B, T, N, H), dtype), random_array(rng, (B, S, K, H), dtype),
            random_array(rng, (B, S, K, H), dtype))


def _check(impl, got, want):
    tol = 1e-10 if dtype_for(impl) == jnp.float64 else 2e-5
    assert_nan_pattern_and_close(got[0], want[0], tol, "out")
    assert_nan_pattern_and_close(got[1], want[1], tol, "lse")


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_nan_in_query_row(impl, rng):
    """The issue's repro: a NaN in one query element makes that (row, head)
    NaN, also its lse (the cpu path gave 0 and -inf)."""
    q, k, v = _inputs(rng, impl)
    q = q.at[0, 1, 0, 0].set(NAN).at[1, 7, 3, 5].set(NAN)
    got, want = _run(impl, q, k, v), _reference(q, k, v)
    assert np.isnan(got[0][0, 1, 0]).all() and np.isnan(got[1][0, 1, 0])
    assert np.isfinite(got[0][0, 2]).all()
    _check(impl, got, want)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_nan_in_key(impl, rng):
    """A NaN key element: every (row, head) that may attend to it is NaN; under
    causal masking the rows before it do not see it and stay finite
    (metal-emulated dropped the key instead)."""
    q, k, v = _inputs(rng, impl)
    k = k.at[0, 5, 1, 0].set(NAN)
    got, want = _run(impl, q, k, v, is_causal=True), _reference(q, k, v, is_causal=True)
    assert np.isnan(got[1][0, 5:, 2:4]).all() and np.isfinite(got[1][0, :5]).all()
    assert np.isfinite(got[1][1]).all() and np.isfinite(got[1][0, :, 0:2]).all()
    _check(impl, got, want)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_nan_bias(impl, rng):
    """An all-NaN bias row and a single NaN bias entry; a NaN bias entry under a
    False mask entry is invisible."""
    q, k, v = _inputs(rng, impl)
    bias = random_array(rng, (2, 4, 19, 23), jnp.float64 if dtype_for(impl) == jnp.float64
                        else jnp.float32)
    bias = bias.at[0, 1, 3, :].set(NAN).at[1, 2, 10, 17].set(NAN).at[1, 0, 4, 6].set(NAN)
    mask = np.ones((2, 4, 19, 23), bool)
    mask[1, 0, 4, 6] = False
    got, want = _run(impl, q, k, v, bias, jnp.asarray(mask)), _reference(q, k, v, bias, mask)
    assert np.isnan(got[1][0, 3, 1]) and np.isnan(got[1][1, 10, 2])
    assert np.isfinite(got[1][1, 4, 0])
    _check(impl, got, want)


MASKINGS = {
    "mask": dict(mask=True),
    "kv_lengths": dict(key_value_seq_lengths=np.array([11, 23], np.int32)),
    "causal": dict(is_causal=True),
    "window": dict(local_window_size=(2, 1)),
}


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
@pytest.mark.parametrize("how", list(MASKINGS))
def test_nan_in_masked_key_is_invisible(how, impl, rng):
    """NaN in a key no row may attend to (the output is all finite and equals
    the result with that key's values finite)."""
    q, k, v = _inputs(rng, impl, T=13)
    kw = dict(MASKINGS[how])
    mask = None
    if kw.pop("mask", False):
        m = np.ones((2, 1, 13, 23), bool)
        m[0, :, :, 20] = False
        mask = jnp.asarray(m)
    if "key_value_seq_lengths" in kw:
        kw["key_value_seq_lengths"] = jnp.asarray(kw["key_value_seq_lengths"])
    # Key 20 of batch 0 is masked for every row in each of the four settings.
    k_nan = k.at[0, 20].set(NAN)
    got, want = _run(impl, q, k_nan, v, mask=mask, **kw), _reference(q, k, v, mask=mask, **kw)
    assert not np.isnan(got[0]).any() and not np.isnan(got[1]).any()
    _check(impl, got, want)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_nan_gradients(impl, rng):
    """A NaN query row gives NaN gradients for it (and for the keys and values
    it attends to), not silent zeros; rows without NaN keep finite dq."""
    q, k, v = _inputs(rng, impl, B=1)
    q = q.at[0, 4, 1, 2].set(NAN)

    def loss(q, k, v):
        out, lse = jax_mfa.attention(q, k, v, return_residual=True, implementation=impl)
        return jnp.sum(out) + jnp.sum(lse)

    dq, dk, dv = (to64(g) for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
    assert np.isnan(dq[0, 4, 1]).all()
    assert np.isfinite(np.delete(dq, 4, axis=1)).all()
    assert np.isnan(dk[0, :, 0]).all() and np.isnan(dv[0, :, 0]).all()
    assert np.isfinite(dk[0, :, 1]).all()


@pytest.mark.skipif("cpu" not in ALL_IMPLEMENTATIONS, reason="no cpu kernels")
def test_nan_query_decode_split_keys(rng):
    """Decoding (T=1, long S) splits the key range over threads and merges the
    slices: a NaN query must survive the merge."""
    q, k, v = _inputs(rng, "cpu", B=1, T=1, S=2100, N=2, K=1, H=16)
    q = q.at[0, 0, 1, 3].set(NAN)
    got, want = _run("cpu", q, k, v), _reference(q, k, v)
    assert np.isnan(got[0][0, 0, 1]).all() and np.isnan(got[1][0, 0, 1])
    _check("cpu", got, want)

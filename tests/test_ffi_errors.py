"""The C++ handlers validate what they receive and answer with an error (an
exception in Python), never a crash, even when called past the Python checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa  # noqa: F401  (registers the FFI targets)
from jax_mfa import _native

ATTRS = dict(scale=np.float64(0.125), softcap=np.float64(0.0), is_causal=False,
             window_left=np.int64(-1), window_right=np.int64(-1), has_bias=False,
             has_mask=False, has_q_lengths=False, has_kv_lengths=False, has_segment_ids=False,
             has_sinks=False, dropout_rate=np.float64(0.0), dropout_threshold=np.int64(0),
             dropout_broadcast_heads=False)


def _call_forward(q, k, v, bias=None, mask=None, lengths=None, out_shape=None, segments=None,
                  sinks=None, seed=None, **attrs):
    bias = jnp.zeros((1, 1, 1, 1), jnp.float32) if bias is None else bias
    mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask
    lengths = jnp.zeros((1,), jnp.int32) if lengths is None else lengths
    segments = jnp.zeros((1, 1), jnp.int32) if segments is None else segments
    sinks = jnp.zeros((1, 1), jnp.float32) if sinks is None else sinks
    seed = jnp.zeros((1, 6), jnp.uint32) if seed is None else seed
    B, T, N, H = q.shape
    out_shape = out_shape or (jax.ShapeDtypeStruct(q.shape, q.dtype),
                              jax.ShapeDtypeStruct((B, T, N), jnp.float32))
    call = jax.ffi.ffi_call(_native.ffi_target("fwd", "cpu"), out_shape)
    return call(q, k, v, bias, mask, lengths, lengths, segments, segments, sinks, seed,
                **{**ATTRS, **attrs})


def _qkv(B=1, T=5, S=6, N=2, K=1, H=4, dtype=jnp.float32):
    return (jnp.ones((B, T, N, H), dtype), jnp.ones((B, S, K, H), dtype),
            jnp.ones((B, S, K, H), dtype))


def test_valid_call_works():
    out, lse = _call_forward(*_qkv())
    assert out.shape == (1, 5, 2, 4) and np.all(np.isfinite(np.asarray(lse)))


@pytest.mark.parametrize("case, message", [
    (lambda: _call_forward(*_qkv(K=3, N=2)), "multiple of key/value heads"),
    (lambda: _call_forward(*_qkv()[:2], jnp.ones((1, 7, 1, 4), jnp.float32)), "same shape"),
    (lambda: _call_forward(*_qkv(dtype=jnp.int32)), "dtype"),
    (lambda: _call_forward(*_qkv(), bias=jnp.ones((1, 1, 3, 6), jnp.float32), has_bias=True), "bias"),
    (lambda: _call_forward(*_qkv(), mask=jnp.ones((1, 1, 5, 6), jnp.float32), has_mask=True),
     "mask must be bool"),
    (lambda: _call_forward(*_qkv(B=2), lengths=jnp.ones((3,), jnp.int32), has_q_lengths=True),
     "query_seq_lengths"),
    (lambda: _call_forward(*_qkv(), segments=jnp.zeros((1, 5), jnp.int32), has_segment_ids=True),
     "key_value_segment_ids"),
    (lambda: _call_forward(*_qkv(), segments=jnp.zeros((1, 5), jnp.float32),
                           has_segment_ids=True), "query_segment_ids"),
    (lambda: _call_forward(*_qkv(), sinks=jnp.zeros((1, 3), jnp.float32), has_sinks=True),
     "sinks"),
    (lambda: _call_forward(*_qkv(), sinks=jnp.zeros((1, 2), jnp.float64), has_sinks=True),
     "sinks"),
    (lambda: _call_forward(*_qkv(), dropout_rate=np.float64(1.0)), "dropout_rate"),
    (lambda: _call_forward(*_qkv(), dropout_rate=np.float64(0.5),
                           seed=jnp.zeros((1, 2), jnp.uint32)), "dropout seed"),
    (lambda: _call_forward(*_qkv(), dropout_rate=np.float64(0.5),
                           dropout_threshold=np.int64(2**33),
                           seed=jnp.zeros((1, 6), jnp.uint32)), "32 bits"),
    (lambda: _call_forward(*_qkv(), out_shape=(jax.ShapeDtypeStruct((1, 5, 2, 3), jnp.float32),
                                               jax.ShapeDtypeStruct((1, 5, 2), jnp.float32))),
     "out"),
])
def test_bad_operands_return_an_error(case, message):
    with pytest.raises(Exception, match=f"jax_mfa: .*{message}"):
        jax.block_until_ready(case())

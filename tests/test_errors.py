"""Every bad input raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa

B, T, S, N, K, H = 2, 5, 7, 4, 2, 8


def qkv(dtype=jnp.float32, q_shape=(B, T, N, H), k_shape=(B, S, K, H), v_shape=None):
    q = jnp.zeros(q_shape, dtype)
    k = jnp.zeros(k_shape, dtype)
    v = jnp.zeros(v_shape or k_shape, dtype)
    return q, k, v


def call(*args, **kwargs):
    kwargs.setdefault("implementation", "cpu" if "cpu" in jax_mfa.available_implementations()
                      else "xla")
    return jax_mfa.attention(*args, **kwargs)


@pytest.mark.parametrize("q_shape, k_shape, match", [
    ((T, H), (S, K, H), "query must have shape"),
    ((1, B, T, N, H), (1, B, S, K, H), "query must have shape"),
    ((B, T, N, H), (S, K, H), "key must have the same rank"),
    ((T, N, H), (B, S, K, H), "key must have the same rank"),
    ((B, T, N, H), (B + 1, S, K, H), "key batch size"),
    ((B, T, N, H), (B, S, K, H + 1), "key head dim"),
    ((B, T, N, H), (B, S, 3, H), r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ((B, T, N, H), (B, S, 0, H), "key/value heads"),
    ((B, T, N, 0), (B, S, K, 0), "head dim"),
])
def test_bad_shapes(q_shape, k_shape, match):
    q, k, v = qkv(q_shape=q_shape, k_shape=k_shape)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


def test_key_value_shape_mismatch():
    for v_shape in [(B, S + 1, K, H), (B, S, K, H + 1), (B, S, K * 2, H), (S, K, H)]:
        q, k, v = qkv(v_shape=v_shape)
        with pytest.raises(ValueError, match="value must have the same shape as key"):
            call(q, k, v)


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="query, key and value must share one dtype"):
        call(q, k.astype(jnp.float16), v)
    with pytest.raises(TypeError, match="query, key and value must share one dtype"):
        call(q, k, v.astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64, jnp.bool_, jnp.uint8])
def test_unsupported_dtype(dtype):
    q, k, v = qkv(dtype)
    with pytest.raises(TypeError, match="query/key/value dtype"):
        call(q, k, v)


@pytest.mark.parametrize("shape", [(B, N, T, S + 1), (3, N, T, S), (B, 3, T, S), (T + 1, S),
                                   (B, N, T, S, 1), (1, 1, 1, 1, 1)])
def test_bias_not_broadcastable(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bias"):
        call(q, k, v, bias=jnp.zeros(shape, jnp.float32))


def test_bias_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="bias must be a floating-point"):
        call(q, k, v, bias=jnp.zeros((T, S), jnp.int32))


@pytest.mark.parametrize("shape", [(B, N, T, S + 1), (B, N, T + 1, S), (3, 1, 1, S), (S, T),
                                   (1, B, N, T, S)])
def test_mask_not_broadcastable(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="mask"):
        call(q, k, v, mask=jnp.ones(shape, bool))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.int32, jnp.uint8])
def test_mask_not_bool(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="mask must be a bool"):
        call(q, k, v, mask=jnp.ones((T, S), dtype))


@pytest.mark.parametrize("name", ["query_seq_lengths", "key_value_seq_lengths"])
def test_seq_lengths(name):
    q, k, v = qkv()
    for bad in [jnp.zeros((B + 1,), jnp.int32), jnp.zeros((B, 1), jnp.int32),
                jnp.zeros((), jnp.int32)]:
        with pytest.raises(ValueError, match=name):
            call(q, k, v, **{name: bad})
    with pytest.raises(TypeError, match=name):
        call(q, k, v, **{name: jnp.zeros((B,), jnp.float32)})
    with pytest.raises(TypeError, match=name):
        call(q, k, v, **{name: jnp.zeros((B,), bool)})
    # 3-D inputs take a scalar (or shape (1,)) length.
    q3, k3, v3 = q[0], k[0], v[0]
    call(q3, k3, v3, **{name: jnp.asarray(3, jnp.int32)})
    with pytest.raises(ValueError, match=name):
        call(q3, k3, v3, **{name: jnp.zeros((2,), jnp.int32)})


@pytest.mark.parametrize("window, exc, match", [
    (-1, ValueError, "local_window_size must be non-negative"),
    ((2, -1), ValueError, "local_window_size must be non-negative"),
    ((-3, 0), ValueError, "local_window_size must be non-negative"),
    (1.5, TypeError, "local_window_size"),
    ((1, 2, 3), TypeError, "local_window_size"),
    ((1.0, 2), TypeError, "local_window_size"),
    (True, TypeError, "local_window_size"),
    ("3", TypeError, "local_window_size"),
])
def test_bad_window(window, exc, match):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        call(q, k, v, local_window_size=window)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_softcap(softcap):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="softcap"):
        call(q, k, v, softcap=softcap)


def test_softcap_wrong_type():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="softcap"):
        call(q, k, v, softcap="big")


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), -float("inf")])
def test_scale_not_finite(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        call(q, k, v, scale=scale)


def test_traced_scale_and_softcap():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale must be a static"):
        jax.jit(lambda s: call(q, k, v, scale=s))(1.0)
    with pytest.raises(TypeError, match="softcap must be a static"):
        jax.jit(lambda c: call(q, k, v, softcap=c))(1.0)
    with pytest.raises(TypeError, match="scale"):
        call(q, k, v, scale="x")


def test_traced_is_causal():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="is_causal"):
        jax.jit(lambda c: call(q, k, v, is_causal=c))(True)
    with pytest.raises(TypeError, match="is_causal"):
        call(q, k, v, is_causal=1)


@pytest.mark.skipif("cpu" not in jax_mfa.available_implementations(), reason="no cpu kernels")
def test_head_dim_limit_cpu():
    q, k, v = qkv(q_shape=(1, 3, 1, 513), k_shape=(1, 3, 1, 513))
    with pytest.raises(ValueError, match=r"head dim H=513"):
        jax_mfa.attention(q, k, v, implementation="cpu")
    q, k, v = qkv(q_shape=(1, 3, 1, 512), k_shape=(1, 3, 1, 512))
    assert jax_mfa.attention(q, k, v, implementation="cpu").shape == q.shape
    # The xla path has no limit.
    q, k, v = qkv(q_shape=(1, 3, 1, 513), k_shape=(1, 3, 1, 513))
    assert jax_mfa.attention(q, k, v, implementation="xla").shape == q.shape


def test_unknown_implementation():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown implementation 'cuda-fast'"):
        jax_mfa.attention(q, k, v, implementation="cuda-fast")
    with pytest.raises(TypeError, match="implementation must be a string"):
        jax_mfa.attention(q, k, v, implementation=3)


def test_unavailable_implementation():
    q, k, v = qkv()
    assert "metal" not in jax_mfa.available_implementations()
    with pytest.raises(ValueError, match="implementation 'metal' is not available"):
        jax_mfa.attention(q, k, v, implementation="metal")


def test_available_implementations():
    impls = jax_mfa.available_implementations()
    assert isinstance(impls, tuple) and "xla" in impls
    assert impls[0] != "metal-emulated"  # the slow emulator is never the default


def test_errors_under_jit():
    """Checks are static: they raise at trace time under jit as well."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bias"):
        jax.jit(lambda q, k, v, b: call(q, k, v, bias=b))(q, k, v, jnp.zeros((3, S), jnp.float32))
    with pytest.raises(TypeError, match="mask must be a bool"):
        jax.jit(lambda q, k, v, m: call(q, k, v, mask=m))(q, k, v, np.ones((T, S), np.int8))

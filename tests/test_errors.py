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


# ----------------------------------------------------------------------------
# scale and softcap against the accumulation dtype; array-likes; short messages


@pytest.mark.parametrize("dtype, softcap", [
    (jnp.float32, 1e300), (jnp.float32, 1e39), (jnp.float32, 1e-40), (jnp.float32, 1e-45),
    (jnp.float64, 1e-310), (jnp.float64, 1e309), (jnp.float32, 1e32), (jnp.float64, 1e293),
])
def test_softcap_out_of_range(dtype, softcap):
    """softcap must be finite and normal in the accumulation dtype (the issue:
    1e300 gave zeros and lse -inf on cpu, NaN on xla; 1e-40 was ignored)."""
    q, k, v = qkv(dtype)
    with pytest.raises(ValueError, match="softcap must be a positive number, normal"):
        call(q, k, v, softcap=softcap)


@pytest.mark.parametrize("dtype, scale", [(jnp.float32, 1e39), (jnp.float32, -1e300),
                                          (jnp.float16, 1e300), (jnp.float64, 1e309)])
def test_scale_out_of_range(dtype, scale):
    q, k, v = qkv(dtype)
    with pytest.raises(ValueError, match="scale must be finite"):
        call(q, k, v, scale=scale)


@pytest.mark.parametrize("name", ["scale", "softcap"])
@pytest.mark.parametrize("value", ["0.5", True, np.bool_(True), 1 + 2j, [0.5], None.__class__,
                                   np.ones(3, np.float32)])
def test_scale_softcap_not_real(name, value):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        call(q, k, v, **{name: value})


def test_scale_softcap_accepted_types():
    """Python, NumPy and 0-d concrete JAX numbers; scale 0 and negative too (as jax.nn)."""
    q, k, v = qkv()
    for value in (0.5, 2, np.float32(0.5), np.int32(2), jnp.asarray(0.5), np.asarray(0.5)):
        call(q, k, v, scale=value, softcap=value)
    call(q, k, v, scale=0.0)
    call(q, k, v, scale=-1.5)
    # float64 inputs accumulate in float64: a softcap beyond float32 is fine there.
    call(*qkv(jnp.float64), softcap=1e200, scale=1e300)


def test_array_likes_are_accepted():
    """Lists for q, k, v, bias, mask and lengths, as jnp.asarray would take them."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    bias = rng.standard_normal((T, S)).astype(np.float32)
    mask = rng.random((B, 1, T, S)) < 0.7
    ql, kl = [T, 2], [S, 4]
    want = call(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias),
                jnp.asarray(mask), query_seq_lengths=jnp.asarray(ql, jnp.int32),
                key_value_seq_lengths=jnp.asarray(kl, jnp.int32))
    got = call(q.tolist(), k.tolist(), v.tolist(), bias.tolist(), mask.tolist(),
               query_seq_lengths=ql, key_value_seq_lengths=kl)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                               rtol=1e-6, atol=1e-6)
    # NumPy arrays too, and 3-D inputs with scalar lengths.
    got3 = call(q[0], k[0], v[0], query_seq_lengths=3, key_value_seq_lengths=np.int32(5))
    assert got3.shape == (T, N, H)


BIG = list(range(10_000))


@pytest.mark.parametrize("kwargs, exc", [
    (dict(query=[BIG]), ValueError),                   # 2-D query
    (dict(bias=[[0.5] * 10_000]), ValueError),         # not broadcastable
    (dict(mask=[[1] * 10_000]), TypeError),            # not bool
    (dict(query=[[1.0, 2.0], [3.0]] * 5_000), TypeError),  # ragged
    (dict(query_seq_lengths=BIG), ValueError),
    (dict(local_window_size=np.arange(10_000)), TypeError),
    (dict(local_window_size=tuple(BIG)), TypeError),
    (dict(scale=np.ones(10_000)), TypeError),
    (dict(softcap=BIG), TypeError),
    (dict(implementation=np.zeros(10_000)), TypeError),
    (dict(query="a" * 10_000), TypeError),
    (dict(query={"q": BIG}), TypeError),
])
def test_messages_never_print_whole_arrays(kwargs, exc):
    q, k, v = qkv()
    args = dict(query=q, key=k, value=v)
    args.update(kwargs)
    args.setdefault("implementation", "cpu" if "cpu" in jax_mfa.available_implementations()
                    else "xla")
    with pytest.raises(exc) as info:
        jax_mfa.attention(args.pop("query"), args.pop("key"), args.pop("value"), **args)
    message = str(info.value)
    assert len(message) < 300, message[:500]
    assert "9999" not in message and "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" not in message
    assert info.value.__cause__ is None or len(str(info.value.__cause__)) < 300

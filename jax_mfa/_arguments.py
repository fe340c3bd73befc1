"""Checks and normalises the arguments of :func:`jax_mfa.attention`.

Everything the kernels rely on is verified here, in Python, before any kernel
runs: bad input raises ``ValueError``/``TypeError`` naming the argument and what
was expected.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_mfa import _philox

# Storage dtypes the fused kernels accept for query, key and value.
SUPPORTED_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64)


@dataclasses.dataclass(frozen=True)
class Options:
    """The static part of a call: hashable, it travels as FFI attributes."""

    scale: float
    softcap: float  # 0.0: off
    is_causal: bool
    window_left: int  # -1: unbounded
    window_right: int
    has_bias: bool
    has_mask: bool
    has_q_lengths: bool
    has_kv_lengths: bool
    # Packed sequences, attention sinks and dropout (see Operands).
    has_segment_ids: bool = False
    has_sinks: bool = False
    dropout_rate: float = 0.0
    dropout_broadcast_heads: bool = False  # one mask for all heads (Flax's broadcast_dropout)

    def ffi_attributes(self) -> dict[str, Any]:
        return dict(
            scale=np.float64(self.scale),
            softcap=np.float64(self.softcap),
            is_causal=self.is_causal,
            window_left=np.int64(self.window_left),
            window_right=np.int64(self.window_right),
            has_bias=self.has_bias,
            has_mask=self.has_mask,
            has_q_lengths=self.has_q_lengths,
            has_kv_lengths=self.has_kv_lengths,
            has_segment_ids=self.has_segment_ids,
            has_sinks=self.has_sinks,
            dropout_rate=np.float64(self.dropout_rate),
            dropout_threshold=np.int64(_philox.threshold(self.dropout_rate)),
            dropout_broadcast_heads=self.dropout_broadcast_heads,
        )


@dataclasses.dataclass
class Operands:
    """Rank-4 operands in the kernels' layout. Absent optional operands are
    1-element placeholders (their ``has_*`` flag in Options is False)."""

    query: jax.Array  # (B, T, N, H)
    key: jax.Array  # (B, S, K, H)
    value: jax.Array  # (B, S, K, H)
    bias: jax.Array  # broadcast shape (each dim 1 or full), accumulation dtype
    mask: jax.Array  # broadcast shape, bool
    q_lengths: jax.Array  # (B,) int32
    kv_lengths: jax.Array  # (B,) int32
    q_segments: jax.Array = None  # (B, T) int32
    kv_segments: jax.Array = None  # (B, S) int32
    sinks: jax.Array = None  # (1 or B, N), accumulation dtype
    dropout_seed: jax.Array = None  # (B, 6) uint32: key words, counter origin (_philox)

    def __post_init__(self):
        # Placeholders for the optional operands a caller left out.
        if self.q_segments is None:
            self.q_segments = jnp.zeros((1, 1), jnp.int32)
        if self.kv_segments is None:
            self.kv_segments = jnp.zeros((1, 1), jnp.int32)
        if self.sinks is None:
            acc = np.float32 if self.query is None else accumulation_dtype(self.query.dtype)
            self.sinks = jnp.zeros((1, 1), acc)
        if self.dropout_seed is None:
            self.dropout_seed = jnp.zeros((1, _philox.SEED_WORDS), jnp.uint32)

    def as_tuple(self):
        return (self.query, self.key, self.value, self.bias, self.mask, self.q_lengths,
                self.kv_lengths, self.q_segments, self.kv_segments, self.sinks,
                self.dropout_seed)


# Operands of the forward kernel call (Operands.as_tuple()); the backward call adds lse, dout, delta.
NUM_OPERANDS = len(dataclasses.fields(Operands))


def accumulation_dtype(dtype) -> np.dtype:
    """float64 inputs accumulate (and keep bias, lse) in float64; others in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def describe(x) -> str:
    """A short description of a value for error messages: never a whole array."""
    if x is None or isinstance(x, (bool, numbers.Number, np.generic)):
        return repr(x)
    if isinstance(x, str):
        return repr(x if len(x) <= 40 else x[:37] + "...")
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (list, tuple)):
        if len(x) <= 4 and all(isinstance(e, (bool, numbers.Number)) for e in x):
            return repr(x)
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def as_array(x, name: str):
    """x as jnp.asarray would give it (lists and other array-likes accepted, as
    jax.nn does); arrays and tracers pass unchanged."""
    if x is None or isinstance(x, (jax.Array, np.ndarray)):
        return x
    if not isinstance(x, (list, tuple, numbers.Number, np.generic)) and not hasattr(
            x, "__array__"):
        raise TypeError(f"{name} must be an array or array-like, got {describe(x)}")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array or array-like (a rectangular nested list of "
                        f"numbers), got {describe(x)}") from None


def _shape(x, name: str):
    try:
        return tuple(jnp.shape(x))
    except Exception:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be an array, got {describe(x)}") from None


def _broadcast_4d(x, name: str, full: tuple[int, int, int, int], what: str):
    shape = _shape(x, name)
    if len(shape) > 4:
        raise ValueError(f"{name} must have at most 4 dims, broadcastable to (B, N, T, S) = "
                         f"{full}; got shape {shape}")
    shape4 = (1,) * (4 - len(shape)) + shape
    for got, want in zip(shape4, full):
        if got not in (1, want):
            raise ValueError(f"{name} of shape {shape} is not broadcastable to (B, N, T, S) = "
                             f"{full} ({what})")
    return jnp.reshape(x, shape4)


def _seq_lengths(x, name: str, batch: int, batched_input: bool):
    if x is None:
        return jnp.zeros((1,), jnp.int32), False
    shape = _shape(x, name)
    want = (batch,) if batched_input else ((), (1,))
    ok = shape == want if batched_input else shape in want
    if not ok:
        raise ValueError(f"{name} must have shape {(batch,) if batched_input else '()'} "
                         f"(one length per batch element), got {shape}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{name} must be an integer array (int32), got {jnp.result_type(x)}")
    return jnp.reshape(jnp.asarray(x, jnp.int32), (batch,)), True


def _static_real(x, name: str) -> float:
    """A static real number (Python or NumPy scalar, or a 0-d concrete array)."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")
    real_array = (hasattr(x, "dtype") and np.ndim(x) == 0
                  and (jnp.issubdtype(x.dtype, jnp.floating)
                       or jnp.issubdtype(x.dtype, jnp.integer)))
    if isinstance(x, (bool, np.bool_)) or not (isinstance(x, numbers.Real) or real_array):
        raise TypeError(f"{name} must be a real number, got {describe(x)}")
    return float(x)


def _options_in_range(scale: float, softcap: float | None, acc: np.dtype) -> None:
    """scale finite and softcap positive, finite and normal in the accumulation
    dtype (outside it they round to inf or flush to 0 and every implementation
    would silently compute something else)."""
    info = np.finfo(acc)
    tiny, big = float(info.tiny), float(info.max)  # compared in Python floats
    # A larger softcap makes logits / softcap subnormal for logits of order
    # eps, which flush to zero on some paths and not on others.
    max_softcap = float(info.eps) / tiny
    if not (math.isfinite(scale) and abs(scale) <= big):
        raise ValueError(f"scale must be finite in the accumulation dtype {acc} "
                         f"(|scale| <= {big:.4g}), got {scale!r}")
    if softcap is not None and not (tiny <= softcap <= max_softcap):
        raise ValueError(f"softcap must be a positive number, normal in the accumulation "
                         f"dtype {acc} and at most eps/tiny there ({tiny:.4g} to "
                         f"{max_softcap:.4g}), got {softcap!r}")


def _window(local_window_size) -> tuple[int, int]:
    if local_window_size is None:
        return -1, -1
    if isinstance(local_window_size, (int, np.integer)) and not isinstance(local_window_size, bool):
        left = right = int(local_window_size)
    elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
          and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                  for w in local_window_size)):
        left, right = (int(w) for w in local_window_size)
    else:
        raise TypeError("local_window_size must be an int or a (left, right) tuple of ints, "
                        f"got {describe(local_window_size)}")
    if left < 0 or right < 0:
        raise ValueError(f"local_window_size must be non-negative, got {(left, right)}")
    return left, right


def _segment_ids(q_ids, kv_ids, B: int, T: int, S: int, batched_input: bool):
    """(q_segments (B, T), kv_segments (B, S), present) from the two id arrays."""
    if (q_ids is None) != (kv_ids is None):
        raise ValueError("query_segment_ids and key_value_segment_ids must be given together "
                         "(both or neither)")
    if q_ids is None:
        return None, None, False
    out = []
    for x, name, length, letter in ((q_ids, "query_segment_ids", T, "T"),
                                    (kv_ids, "key_value_segment_ids", S, "S")):
        shape = _shape(x, name)
        want = (B, length) if batched_input else (length,)
        if shape != want:
            raise ValueError(f"{name} must have shape "
                             f"{'(B, ' + letter + ')' if batched_input else '(' + letter + ',)'}"
                             f" = {want}, got {shape}")
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise TypeError(f"{name} must be an integer array (int32), got "
                            f"{jnp.result_type(x)}")
        out.append(jnp.reshape(jnp.asarray(x, jnp.int32), (B, length)))
    return out[0], out[1], True


def _sinks(sinks, N: int, acc):
    if sinks is None:
        return None
    shape = _shape(sinks, "sinks")
    if shape != (N,):
        raise ValueError(f"sinks must have shape (N,) = ({N},) (one logit per query head), "
                         f"got {shape}")
    if not jnp.issubdtype(jnp.result_type(sinks), jnp.floating):
        raise TypeError(f"sinks must be a floating-point array, got {jnp.result_type(sinks)}")
    return jnp.reshape(jnp.asarray(sinks).astype(acc), (1, N))


def _dropout(rate, rng, B: int, broadcast: bool):
    """(rate, seed (B, 6) uint32 or None) from dropout_rate and dropout_rng.
    With `broadcast`, every batch row draws the mask of batch index 0."""
    rate = _static_real(rate, "dropout_rate")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0, None
    if rng is None:
        raise ValueError(f"dropout_rng (a JAX PRNG key) is required when dropout_rate > 0 "
                         f"(got dropout_rate={rate})")
    rng_dtype, rng_shape = jnp.result_type(rng), _shape(rng, "dropout_rng")
    typed = jnp.issubdtype(rng_dtype, jax.dtypes.prng_key)
    if not (typed or (rng_dtype == np.uint32 and rng_shape in ((2,), (4,)))):
        raise TypeError("dropout_rng must be a JAX PRNG key (jax.random.key or "
                        f"jax.random.PRNGKey), got dtype {rng_dtype} and shape {rng_shape}")
    if typed and rng_shape != ():
        raise ValueError(f"dropout_rng must be a single key, got shape {rng_shape}")
    words = _philox.key_words(rng)
    rows = (jnp.zeros if broadcast else jnp.arange)(B, dtype=jnp.uint32)
    return rate, _philox.make_seed(words, rows)


def prepare(query, key, value, bias, mask, *, scale, is_causal, query_seq_lengths,
            key_value_seq_lengths, local_window_size, softcap,
            max_head_dim: int | None, query_segment_ids=None, key_value_segment_ids=None,
            sinks=None, dropout_rate=0.0, dropout_rng=None, dropout_broadcast: bool = False,
            key_columns: int | None = None) -> tuple[Operands, Options, bool]:
    """Returns (operands, options, was_3d) or raises a clear error.
    key_columns: the key dim of bias and mask when it differs from the key
    block's length S (ring attention: every device has all keys' columns)."""
    q_shape, k_shape, v_shape = (_shape(a, n) for a, n in
                                 ((query, "query"), (key, "key"), (value, "value")))
    if len(q_shape) not in (3, 4):
        raise ValueError(f"query must have shape (B, T, N, H) or (T, N, H), got {q_shape}")
    if len(k_shape) != len(q_shape):
        raise ValueError(f"key must have the same rank as query ({len(q_shape)}): expected "
                         f"{'(B, S, K, H)' if len(q_shape) == 4 else '(S, K, H)'}, got {k_shape}")
    if v_shape != k_shape:
        raise ValueError(f"value must have the same shape as key {k_shape}, got {v_shape}")
    was_3d = len(q_shape) == 3
    if was_3d:
        q_shape, k_shape = (1,) + q_shape, (1,) + k_shape
    B, T, N, H = q_shape
    _, S, K, Hk = k_shape
    if k_shape[0] != B:
        raise ValueError(f"key batch size {k_shape[0]} must equal query batch size {B}")
    if Hk != H:
        raise ValueError(f"key head dim {Hk} must equal query head dim {H}")
    if K == 0 or N % K != 0:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    if H < 1 or (max_head_dim is not None and H > max_head_dim):
        raise ValueError(f"head dim H={H} is not supported by this implementation "
                         f"(supported: 1..{max_head_dim})")

    dtypes = {jnp.result_type(a) for a in (query, key, value)}
    if len(dtypes) != 1:
        raise TypeError("query, key and value must share one dtype, got "
                        f"{', '.join(str(jnp.result_type(a)) for a in (query, key, value))}")
    dtype = dtypes.pop()
    if dtype not in {np.dtype(d) for d in SUPPORTED_DTYPES}:
        raise TypeError(f"query/key/value dtype must be float32, float16, bfloat16 or float64, "
                        f"got {dtype}")
    acc = accumulation_dtype(dtype)

    if isinstance(is_causal, jax.core.Tracer) or not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    scale_value = 1.0 / math.sqrt(H) if scale is None else _static_real(scale, "scale")
    softcap_value = None if softcap is None else _static_real(softcap, "softcap")
    _options_in_range(scale_value, softcap_value, acc)
    window_left, window_right = _window(local_window_size)

    full = (B, N, T, S if key_columns is None else key_columns)
    if bias is not None:
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise TypeError(f"bias must be a floating-point array, got {jnp.result_type(bias)}")
        bias4 = _broadcast_4d(jnp.asarray(bias).astype(acc), "bias", full, "bias")
    else:
        bias4 = jnp.zeros((1, 1, 1, 1), acc)
    if mask is not None:
        if jnp.result_type(mask) != np.bool_:
            raise TypeError(f"mask must be a bool array (True = attend), got "
                            f"{jnp.result_type(mask)}")
        mask4 = _broadcast_4d(mask, "mask", full, "mask")
    else:
        mask4 = jnp.ones((1, 1, 1, 1), bool)
    q_lengths, has_q = _seq_lengths(query_seq_lengths, "query_seq_lengths", B, not was_3d)
    kv_lengths, has_kv = _seq_lengths(key_value_seq_lengths, "key_value_seq_lengths", B,
                                      not was_3d)

    q_segments, kv_segments, has_segments = _segment_ids(
        query_segment_ids, key_value_segment_ids, B, T, S, not was_3d)
    sinks2 = _sinks(sinks, N, acc)
    rate, seed = _dropout(dropout_rate, dropout_rng, B, dropout_broadcast)

    if was_3d:
        query, key, value = (jnp.expand_dims(a, 0) for a in (query, key, value))
    operands = Operands(jnp.asarray(query), jnp.asarray(key), jnp.asarray(value), bias4, mask4,
                        q_lengths, kv_lengths, q_segments, kv_segments, sinks2, seed)
    options = Options(scale=scale_value, softcap=softcap_value or 0.0, is_causal=bool(is_causal),
                      window_left=window_left, window_right=window_right,
                      has_bias=bias is not None, has_mask=mask is not None,
                      has_q_lengths=has_q, has_kv_lengths=has_kv,
                      has_segment_ids=has_segments, has_sinks=sinks2 is not None,
                      dropout_rate=rate, dropout_broadcast_heads=bool(dropout_broadcast))
    return operands, options, was_3d

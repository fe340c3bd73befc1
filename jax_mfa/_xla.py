"""The "xla" implementation: plain JAX operations with jax_mfa's semantics.

It materialises the (B, N, T, S) scores like ``jax.nn.dot_product_attention``
and is differentiated by JAX itself. It serves as the comparison path and as the
fallback on platforms the fused kernels do not run on (cuda, rocm, tpu).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mfa import _philox
from jax_mfa._arguments import Operands, Options, accumulation_dtype


def allowed_keys(ops: Operands, opt: Options, shape) -> jax.Array:
    """Boolean (B, N|1, T, S) array: which keys each query row may attend to."""
    B, T, N, S = shape
    i = jnp.arange(T)[:, None]
    j = jnp.arange(S)[None, :]
    allowed = jnp.ones((T, S), bool)
    if opt.is_causal:
        allowed &= j <= i
    if opt.window_left >= 0:
        allowed &= j >= i - opt.window_left
    if opt.window_right >= 0:
        allowed &= j <= i + opt.window_right
    allowed = allowed[None, None]
    if opt.has_q_lengths:
        allowed = allowed & (i < ops.q_lengths[:, None, None, None])
    if opt.has_kv_lengths:
        allowed = allowed & (j < ops.kv_lengths[:, None, None, None])
    if opt.has_mask:
        allowed = allowed & ops.mask
    if opt.has_segment_ids:
        allowed = allowed & (ops.q_segments[:, None, :, None] == ops.kv_segments[:, None, None, :])
    return allowed


def dropout_factors(ops: Operands, opt: Options, shape, dtype) -> jax.Array:
    """(B, N, T, S) factors the probabilities are multiplied by: 0 where the
    generator drops an entry, 1 / (1 - rate) where it keeps it."""
    keep = _philox.keep_mask(ops.dropout_seed, opt.dropout_rate, shape,
                             broadcast=opt.dropout_broadcast_heads)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - opt.dropout_rate), dtype), 0)


def attention(ops: Operands, opt: Options) -> tuple[jax.Array, jax.Array]:
    """Returns (out (B, T, N, H), lse (B, T, N)); empty rows give 0 and -inf."""
    q, k, v = ops.query, ops.key, ops.value
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    group = N // K
    qg = q.astype(acc).reshape(B, T, K, group, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(acc)).reshape(B, N, T, S)
    logits = logits * jnp.asarray(opt.scale, acc)
    if opt.softcap > 0:
        logits = opt.softcap * jnp.tanh(logits / opt.softcap)
    if opt.has_bias:
        logits = logits + ops.bias
    allowed = allowed_keys(ops, opt, (B, T, N, S))
    logits = jnp.where(allowed, logits, -jnp.inf)
    # Softmax is shift-invariant: the max needs no gradient.
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    if opt.has_sinks:  # one extra logit per head, without a value
        sink = ops.sinks[:, :, None, None]
        row_max = jnp.maximum(row_max, sink)
    row_max = jax.lax.stop_gradient(row_max)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if opt.has_sinks:
        denom = denom + jnp.exp(sink - row_max)
    # No allowed key (and no sink): denom is 0. An allowed NaN logit makes
    # denom NaN, and the row's out and lse NaN (as in jax.nn), so test `!= 0`.
    has_key = denom != 0
    safe_denom = jnp.where(has_key, denom, 1)
    probs = p / safe_denom
    if opt.dropout_rate > 0:
        probs = probs * dropout_factors(ops, opt, (B, N, T, S), acc)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.reshape(B, K, group, T, S),
                     v.astype(acc)).reshape(B, T, N, H)
    lse = jnp.where(has_key, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]  # (B, N, T)
    return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))

"""The "xla" implementation: plain JAX operations with jax_mfa's semantics.

It materialises the (B, N, T, S) scores like ``jax.nn.dot_product_attention``
and is differentiated by JAX itself. It serves as the comparison path and as the
path for small problems on platforms the fused kernels do not run on (cuda,
rocm, tpu) when jax.nn cannot express the call (see jax_mfa._api).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mfa import _philox
from jax_mfa._arguments import Operands, Options, accumulation_dtype


def allowed_at(opt: Options, i, j, q_lengths, kv_lengths, mask, ndim: int, q_segments=None,
               kv_segments=None) -> jax.Array:
    """Which keys each query row may attend to (the masking rules, in one place):
    query positions i of shape (rows, 1), key positions j (1, keys), lengths
    (B,), mask None or broadcastable to the result, segment ids None or the
    rows' (B, rows) and the keys' (B, keys). A bool array of `ndim` dims, the
    last two (rows, keys), the first the batch (or 1)."""
    allowed = jnp.ones(jnp.broadcast_shapes(jnp.shape(i), jnp.shape(j)), bool)
    if opt.is_causal:
        allowed &= j <= i
    if opt.window_left >= 0:
        allowed &= j >= i - opt.window_left
    if opt.window_right >= 0:
        allowed &= j <= i + opt.window_right
    allowed = allowed.reshape((1,) * (ndim - 2) + allowed.shape)
    per_batch = lambda x: x.reshape((-1,) + (1,) * (ndim - 1))  # noqa: E731
    if opt.has_q_lengths:
        allowed = allowed & (i < per_batch(q_lengths))
    if opt.has_kv_lengths:
        allowed = allowed & (j < per_batch(kv_lengths))
    if opt.has_mask:
        allowed = allowed & mask
    if q_segments is not None:  # (B, rows) and (B, keys): equal ids only
        lead = (1,) * (ndim - 3)
        allowed = allowed & (q_segments.reshape(q_segments.shape[:1] + lead + (-1, 1))
                             == kv_segments.reshape(kv_segments.shape[:1] + lead + (1, -1)))
    return allowed


def dropout_factors(ops: Operands, opt: Options, shape, dtype, q_start=0,
                    k_start=0) -> jax.Array:
    """(B, N, T, S) factors the probabilities are multiplied by: 0 where the
    generator drops an entry, 1 / (1 - rate) where it keeps it. Rows and keys
    at absolute positions q_start + i, k_start + j."""
    keep = _philox.keep_mask(ops.dropout_seed, opt.dropout_rate, shape,
                             broadcast=opt.dropout_broadcast_heads, q_start=q_start,
                             k_start=k_start)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - opt.dropout_rate), dtype), 0)

def sinks_gradient(sinks, lse, delta):
    """d sinks from the backward's delta = rowsum(dO * O) - dlse.

    The sink's probability in row (b, i, n) is p = exp(sinks[n] - lse); since
    it carries no value, d out / d sink = -p * out and d lse / d sink = p, so
    d sinks[n] = -sum_{b,i} p * delta (with or without dropout, which only
    rescales the value terms that make up out). Summed over rows the sinks
    operand broadcasts over ((1, N): all batch rows)."""
    p = jnp.where(jnp.isneginf(lse), 0, jnp.exp(sinks[:, None, :] - lse))  # (B, T, N)
    d = -jnp.sum(p * delta, axis=1)  # (B, N)
    return jnp.sum(d, axis=0, keepdims=True) if sinks.shape[0] == 1 else d


def allowed_keys(ops: Operands, opt: Options, shape, q_start=0, k_start=0) -> jax.Array:
    """Boolean (B, N|1, T, S) array: which keys each query row may attend to.
    Rows and keys are at absolute positions q_start + i and k_start + j (a
    block of a longer sequence, e.g. in ring attention)."""
    _, T, _, S = shape
    # ops may be None when only the structural rules (causal, window) are on.
    q_lengths, kv_lengths, mask = (None, None, None) if ops is None else (
        ops.q_lengths, ops.kv_lengths, ops.mask)
    q_segments, kv_segments = ((ops.q_segments, ops.kv_segments)
                               if ops is not None and opt.has_segment_ids else (None, None))
    return allowed_at(opt, q_start + jnp.arange(T)[:, None], k_start + jnp.arange(S)[None, :],
                      q_lengths, kv_lengths, mask, ndim=4, q_segments=q_segments,
                      kv_segments=kv_segments)


def _masked_logits(ops: Operands, opt: Options) -> jax.Array:
    """(B, N, T, S) logits in the accumulation dtype, -inf where not allowed."""
    q, k = ops.query, ops.key
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    qg = q.astype(acc).reshape(B, T, K, N // K, H)
    # Full precision (GPUs would otherwise multiply float32 in TF32).
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(acc),
                        precision=jax.lax.Precision.HIGHEST).reshape(B, N, T, S)
    logits = logits * jnp.asarray(opt.scale, acc)
    if opt.softcap > 0:
        logits = opt.softcap * jnp.tanh(logits / opt.softcap)
    if opt.has_bias:
        logits = logits + ops.bias
    return jnp.where(allowed_keys(ops, opt, (B, T, N, S)), logits, -jnp.inf)


def _weighted_values(p, v) -> jax.Array:
    """(B, T, N, H) = sum over keys of p (B, N, T, S) times v (B, S, K, H)."""
    B, N, T, S = p.shape
    K, H = v.shape[2], v.shape[3]
    out = jnp.einsum("bkgts,bskh->btkgh", p.reshape(B, K, N // K, T, S), v.astype(p.dtype),
                     precision=jax.lax.Precision.HIGHEST)
    return out.reshape(B, T, N, H)


def attention(ops: Operands, opt: Options) -> tuple[jax.Array, jax.Array]:
    """Returns (out (B, T, N, H), lse (B, T, N)); empty rows give 0 and -inf."""
    logits = _masked_logits(ops, opt)
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
        B, N, T, S = probs.shape
        probs = probs * dropout_factors(ops, opt, (B, N, T, S), probs.dtype)
    out = _weighted_values(probs, ops.value)
    lse = jnp.where(has_key, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]  # (B, N, T)
    return out.astype(ops.query.dtype), jnp.transpose(lse, (0, 2, 1))


def backward(ops: Operands, opt: Options, lse, dout, delta):
    """(dq, dk, dv, dbias) as the fused backward kernel computes them: the
    probabilities are exp(logits - lse) with the given lse, and
    delta = rowsum(dout * out) - dlse. With the lse and delta of whole rows,
    this is a key block's exact share of the gradients (ring attention).
    It differentiates h = sum(dout * P V) - sum(delta * rowsum(P)) with lse held
    fixed: dh/dlogits = P * (dout . v - delta), the softmax gradient."""
    acc = accumulation_dtype(ops.query.dtype)
    lse = jnp.transpose(lse, (0, 2, 1))[..., None]  # (B, N, T, 1)
    lse = jnp.where(jnp.isfinite(lse), lse, 0)  # rows without keys: P = 0 anyway

    def h(q, k, v, bias):
        block = Operands(q, k, v, bias, *ops.as_tuple()[4:])
        p = jnp.exp(_masked_logits(block, opt) - lse)
        rows = jnp.transpose(delta, (0, 2, 1))[..., None].astype(acc)
        return (jnp.sum(_weighted_values(p, v) * dout.astype(acc))
                - jnp.sum(p * rows))

    grads = jax.grad(h, argnums=(0, 1, 2, 3))(*ops.as_tuple()[:4])
    return tuple(g.astype(x.dtype) for g, x in zip(grads, ops.as_tuple()[:4]))

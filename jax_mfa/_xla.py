"""The "xla" implementation: plain JAX operations with jax_mfa's semantics.

It materialises the (B, N, T, S) scores like ``jax.nn.dot_product_attention``
and is differentiated by JAX itself. It serves as the comparison path and as the
path for small problems on platforms the fused kernels do not run on (cuda,
rocm, tpu) when jax.nn cannot express the call (see jax_mfa._api).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_mfa._arguments import Operands, Options, accumulation_dtype


def allowed_at(opt: Options, i, j, q_lengths, kv_lengths, mask, ndim: int) -> jax.Array:
    """Which keys each query row may attend to (the masking rules, in one place):
    query positions i of shape (rows, 1), key positions j (1, keys), lengths
    (B,), mask None or broadcastable to the result. A bool array of `ndim`
    dims, the last two (rows, keys), the first the batch (or 1)."""
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
    return allowed


def allowed_keys(ops: Operands, opt: Options, shape, q_start=0, k_start=0) -> jax.Array:
    """Boolean (B, N|1, T, S) array: which keys each query row may attend to.
    Rows and keys are at absolute positions q_start + i and k_start + j (a
    block of a longer sequence, e.g. in ring attention)."""
    _, T, _, S = shape
    # ops may be None when only the structural rules (causal, window) are on.
    q_lengths, kv_lengths, mask = (None, None, None) if ops is None else (
        ops.q_lengths, ops.kv_lengths, ops.mask)
    return allowed_at(opt, q_start + jnp.arange(T)[:, None], k_start + jnp.arange(S)[None, :],
                      q_lengths, kv_lengths, mask, ndim=4)


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
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0)
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    # No allowed key: denom is 0. An allowed NaN logit makes denom NaN, and
    # the row's out and lse NaN (as in jax.nn), so test `!= 0`, not `> 0`.
    has_key = denom != 0
    safe_denom = jnp.where(has_key, denom, 1)
    out = _weighted_values(p / safe_denom, ops.value)
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

"""On GPUs and TPUs: ``jax.nn.dot_product_attention`` wherever it computes
exactly jax_mfa's semantics, so that cuDNN's fused kernels run where they apply.

jax.nn and jax_mfa agree on everything except rows with no allowed key (jax.nn
averages all values there, jax_mfa gives 0): such rows are found from the
masking options alone (mask, lengths, window; a fused reduction, never a
stored T x S array) and set to 0, which also zeroes their gradients. jax.nn
has no softcap, segment ids, sinks or dropout, its lse carries no gradient, and a bias row of -inf values
would make it NaN where jax_mfa gives 0: those calls use jax_mfa's own
implementations instead (see jax_mfa._api).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_mfa import _xla
from jax_mfa._arguments import Operands, Options

# jax.nn's XLA path (and jax_mfa's "xla") store the float32 scores: above this
# many bytes of them the blockwise implementation is used instead.
XLA_SCORES_MAX_BYTES = 1 << 30

# The failures jax.nn raises at trace time for calls cuDNN does not support
# (dtype, head dim, shapes, broadcast masks, no cuDNN): fall back to XLA.
_CUDNN_UNSUPPORTED = (NotImplementedError, ValueError, RuntimeError)


def scores_bytes(ops: Operands) -> int:
    B, T, N, _ = ops.query.shape
    return 4 * B * N * T * ops.key.shape[1]


def agrees(opt: Options, return_residual: bool) -> bool:
    """Whether jax.nn can express a call with these options exactly (it has no
    segment ids, sinks or dropout)."""
    return (opt.softcap == 0 and not opt.has_bias and not return_residual
            and not opt.has_segment_ids and not opt.has_sinks and opt.dropout_rate == 0)


def _all_rows_have_keys(ops: Operands, opt: Options) -> bool:
    """Statically true when no row can be empty (the fix-up is then skipped)."""
    T, S = ops.query.shape[1], ops.key.shape[1]
    if opt.has_mask or opt.has_q_lengths or opt.has_kv_lengths or S == 0:
        return False
    # Row i's keys start at max(0, i - left): empty once i - left >= S.
    return opt.window_left < 0 or T - 1 - opt.window_left <= S - 1


@functools.partial(jax.jit, static_argnames=("opt", "shape"))
def _rows_with_keys(mask, q_lengths, kv_lengths, *, opt: Options, shape):
    """(B, T, N|1) bool: rows with at least one allowed key. Jitted so that XLA
    fuses the (T, S) predicate into the reduction."""
    ops = Operands(None, None, None, None, mask, q_lengths, kv_lengths)
    has_key = jnp.any(_xla.allowed_keys(ops, opt, shape), axis=-1)  # (B|1, N|1, T)
    return jnp.transpose(jnp.broadcast_to(has_key, (shape[0],) + has_key.shape[1:]), (0, 2, 1))


def _cudnn_may_apply(ops: Operands, opt: Options) -> bool:
    dtype = ops.query.dtype
    if dtype not in (jnp.float16, jnp.bfloat16):
        return False
    if any(d.platform != "gpu" for d in jax.devices()):
        return False
    # cuDNN's causal and window masks are only used where their alignment
    # cannot matter (T == S); jax.nn's XLA path takes the rest.
    T, S = ops.query.shape[1], ops.key.shape[1]
    return T == S or not (opt.is_causal or opt.window_left >= 0 or opt.window_right >= 0)


def _call_jax_nn(ops: Operands, opt: Options):
    """(out, route): cuDNN where it applies, else jax.nn's XLA path while the
    scores are small enough; (None, None) otherwise."""
    kwargs = dict(
        bias=None, mask=ops.mask if opt.has_mask else None, scale=opt.scale,
        is_causal=opt.is_causal,
        query_seq_lengths=ops.q_lengths if opt.has_q_lengths else None,
        key_value_seq_lengths=ops.kv_lengths if opt.has_kv_lengths else None,
        local_window_size=(opt.window_left, opt.window_right) if opt.window_left >= 0 else None)
    if _cudnn_may_apply(ops, opt):
        try:
            return (jax.nn.dot_product_attention(ops.query, ops.key, ops.value,
                                                 implementation="cudnn", **kwargs),
                    "jax.nn (cudnn)")
        except _CUDNN_UNSUPPORTED:
            pass
    if scores_bytes(ops) > XLA_SCORES_MAX_BYTES:
        return None, None
    return (jax.nn.dot_product_attention(ops.query, ops.key, ops.value, implementation="xla",
                                         **kwargs), "jax.nn (xla)")


def attention(ops: Operands, opt: Options) -> tuple[jax.Array, str] | None:
    """(out, which path) through jax.nn, or None when neither cuDNN applies nor
    the scores are small enough for jax.nn's XLA path."""
    # float32/float64: full-precision products (GPUs would otherwise use TF32).
    precision = "highest" if jnp.dtype(ops.query.dtype).itemsize >= 4 else None
    with jax.default_matmul_precision(precision):
        out, route = _call_jax_nn(ops, opt)
    if out is None:
        return None
    if not _all_rows_have_keys(ops, opt):
        B, T, N, _ = ops.query.shape
        has_key = _rows_with_keys(ops.mask, ops.q_lengths, ops.kv_lengths, opt=opt,
                                  shape=(B, T, N, ops.key.shape[1]))
        out = jnp.where(has_key[..., None], out, jnp.zeros((), out.dtype))
    return out, route

"""An independent float64 reference for jax_mfa.attention, written from the
documented semantics only (it imports nothing from jax_mfa).

One implementation over an array module ``xp``: with ``xp=numpy`` it gives the
forward values; with ``xp=jax.numpy`` (float64, jax_enable_x64 on) it is
differentiable, and jax.vjp of it gives the reference gradients.

Semantics:
  logits = scale * q.k          (scale defaults to 1/sqrt(H))
  logits = softcap * tanh(logits / softcap)     if softcap
  logits = logits + bias        (bias broadcastable to (B, N, T, S))
  allowed = mask & causal (j <= i) & window (i-left <= j <= i+right)
            & (i < q_len[b]) & (j < kv_len[b])
  p = softmax over allowed keys; a row with no allowed key: out 0, lse -inf.
  An allowed NaN logit makes its row's out and lse NaN; masked entries never matter.
  query head n uses key/value head n // (N // K).
  segment ids: allowed &= (q_ids[b, i] == kv_ids[b, j]).
  sinks: one extra term exp(sinks[n]) in each row's denominator (and in lse);
         a row with no allowed key then has lse = sinks[n].
  dropout: probabilities multiplied by dropout_keep / (1 - dropout_rate), the
         keep mask (B, N, T, S) being given by the caller.
"""

from __future__ import annotations

import math

import numpy as np


def allowed_keys(xp, B, T, S, *, mask=None, is_causal=False, window=None, q_lengths=None,
                 kv_lengths=None):
    """Boolean array broadcastable to (B, N, T, S): which keys each query row sees."""
    i = np.arange(T)[:, None]
    j = np.arange(S)[None, :]
    structural = np.ones((T, S), bool)
    if is_causal:
        structural = structural & (j <= i)
    if window is not None:
        left, right = (window, window) if np.ndim(window) == 0 else tuple(window)
        structural = structural & (j >= i - left) & (j <= i + right)
    allowed = xp.asarray(structural)[None, None]  # (1, 1, T, S)
    if q_lengths is not None:
        qlen = xp.reshape(xp.asarray(q_lengths), (-1, 1, 1, 1))
        allowed = allowed & (xp.asarray(i)[None, None] < qlen)
    if kv_lengths is not None:
        kvlen = xp.reshape(xp.asarray(kv_lengths), (-1, 1, 1, 1))
        allowed = allowed & (xp.asarray(j)[None, None] < kvlen)
    if mask is not None:
        allowed = allowed & xp.asarray(mask, dtype=bool)
    return allowed


def attention(xp, query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
              softcap=None, query_segment_ids=None, key_value_segment_ids=None, sinks=None,
              dropout_keep=None, dropout_rate=0.0, dtype=np.float64):
    """Returns (out, lse) in `dtype`; out has query's shape, lse is (B, T, N) or (T, N)."""
    was_3d = np.ndim(query) == 3
    q = xp.asarray(query, dtype=dtype)
    k = xp.asarray(key, dtype=dtype)
    v = xp.asarray(value, dtype=dtype)
    if was_3d:
        q, k, v = (xp.expand_dims(a, 0) for a in (q, k, v))
        if query_seq_lengths is not None:
            query_seq_lengths = xp.reshape(xp.asarray(query_seq_lengths), (1,))
        if key_value_seq_lengths is not None:
            key_value_seq_lengths = xp.reshape(xp.asarray(key_value_seq_lengths), (1,))
        if query_segment_ids is not None:
            query_segment_ids = xp.expand_dims(xp.asarray(query_segment_ids), 0)
            key_value_segment_ids = xp.expand_dims(xp.asarray(key_value_segment_ids), 0)
        if dropout_keep is not None:
            dropout_keep = xp.expand_dims(xp.asarray(dropout_keep), 0)
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    group = N // K
    # Each query head reads kv head n // group: repeat kv heads to N.
    k_rep = xp.repeat(k, group, axis=2)
    v_rep = xp.repeat(v, group, axis=2)
    s = (1.0 / math.sqrt(H)) if scale is None else float(scale)
    logits = xp.einsum("btnh,bsnh->bnts", q, k_rep) * s
    if softcap:
        logits = softcap * xp.tanh(logits / softcap)
    if bias is not None:
        logits = logits + xp.asarray(bias, dtype=dtype)
    allowed = allowed_keys(xp, B, T, S, mask=mask, is_causal=is_causal, window=local_window_size,
                           q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths)
    if query_segment_ids is not None:
        qs = xp.asarray(query_segment_ids)[:, None, :, None]
        ks = xp.asarray(key_value_segment_ids)[:, None, None, :]
        allowed = allowed & (qs == ks)
    allowed = xp.broadcast_to(allowed, (B, N, T, S))
    masked = xp.where(allowed, logits, -np.inf)
    row_max = xp.max(masked, axis=-1, keepdims=True)
    if sinks is not None:
        sink = xp.reshape(xp.asarray(sinks, dtype=dtype), (1, N, 1, 1))
        row_max = xp.maximum(row_max, sink)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    # Masked entries are exactly 0 (exp(-inf)); the where keeps their gradient 0.
    p = xp.where(allowed, xp.exp(masked - row_max), 0.0)
    denom = xp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + xp.exp(sink - row_max)
    nonempty = denom != 0  # NaN (an allowed NaN logit) propagates to out and lse
    safe = xp.where(nonempty, denom, 1.0)
    probs = p / safe
    if dropout_keep is not None:
        probs = probs * xp.where(xp.asarray(dropout_keep), 1.0 / (1.0 - dropout_rate), 0.0)
    out = xp.einsum("bnts,bsnh->btnh", probs, v_rep)
    lse = xp.where(nonempty, row_max + xp.log(safe), -np.inf)[..., 0]  # (B, N, T)
    lse = xp.transpose(lse, (0, 2, 1))
    if was_3d:
        out, lse = out[0], lse[0]
    return out, lse

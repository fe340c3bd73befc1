"""Flax adapter: use jax_mfa as the ``attention_fn`` of
``flax.nnx.MultiHeadAttention`` or ``flax.linen.MultiHeadDotProductAttention``::

    import jax_mfa.flax
    layer = nnx.MultiHeadAttention(..., attention_fn=jax_mfa.flax.attention_fn)

This module does not import flax (flax is optional).

Dropout on the attention weights works as in flax (``dropout_rate``,
``dropout_rng``, ``deterministic``, ``broadcast_dropout``: one mask shared by
every batch row and head), fused into the kernels; the mask comes from
jax_mfa's own generator (see ``jax_mfa.attention``), so it differs from the
one flax would draw from the same key.

Differences from flax's default ``dot_product_attention``: the weights cannot
be sown (``module`` must be None, i.e. ``sow_weights=False``), and a query row
whose mask allows no key gives 0 (flax gives the mean of the values).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jax_mfa._api import attention

# Keywords flax may pass that do not change the result here: the softmax is
# always computed in float32 (float64 for float64 inputs), and flax's default
# dtype promotion is what attention_fn does anyway.
_IGNORED_KEYWORDS = {"force_fp32_for_softmax", "promote_dtype"}
# Keywords that replace flax's einsums: accepted only when None (the default).
_NONE_ONLY_KEYWORDS = {"einsum_dot_general", "qk_attn_weights_einsum",
                       "attn_weights_value_einsum"}


def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                 dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                 precision=None, module=None, is_causal=False, **kwargs):
    """Drop-in ``attention_fn`` with the signature of flax's ``dot_product_attention``.

    query ``(batch..., T, N, H)``, key/value ``(batch..., S, K, H)``; bias and
    mask broadcastable to ``(batch..., N, T, S)`` (mask: nonzero = attend).
    ``dtype`` (if given) is the dtype q, k and v are cast to, else their common
    promoted dtype. ``precision`` is accepted and ignored: the fused kernels
    accumulate in float32 (float64 for float64 inputs).
    """
    del precision  # fixed accumulation precision
    for name, value_ in kwargs.items():
        if name in _IGNORED_KEYWORDS:
            continue
        if name in _NONE_ONLY_KEYWORDS:
            if value_ is not None:
                raise TypeError(f"jax_mfa.flax.attention_fn does not support a custom {name}")
            continue
        raise TypeError(f"jax_mfa.flax.attention_fn got an unexpected keyword argument {name!r}")
    dropout = {}
    if dropout_rate and not deterministic:
        if dropout_rng is None:
            raise ValueError("jax_mfa.flax.attention_fn: dropout_rate > 0 with "
                             "deterministic=False needs a dropout_rng")
        dropout = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                       _dropout_broadcast=bool(broadcast_dropout))
    if module is not None:
        raise NotImplementedError(
            "jax_mfa.flax.attention_fn cannot sow the attention weights (they are never "
            "materialised); use sow_weights=False")

    if dtype is None:
        dtype = jnp.result_type(query, key, value)
    query, key, value = (jnp.asarray(x).astype(dtype) for x in (query, key, value))
    if query.ndim != key.ndim or query.ndim < 3:
        raise ValueError(f"query and key must have the same rank >= 3, got {query.shape} and "
                         f"{key.shape}")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            mask = mask != 0

    # jax_mfa takes at most one batch dim: flatten flax's (batch..., ) dims.
    batch_shape = query.shape[:-3]
    if len(batch_shape) > 1:
        flat = math.prod(batch_shape)
        *_, T, N, H = query.shape
        S, K = key.shape[-3], key.shape[-2]
        if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
            raise ValueError(f"query, key and value must share batch dims, got {query.shape}, "
                             f"{key.shape}, {value.shape}")

        def flatten_logits_like(x):  # broadcastable to (batch..., N, T, S)
            if x is None:
                return None
            x = jnp.broadcast_to(x, batch_shape + x.shape[-3:]) if x.ndim > 3 else x
            if x.ndim > 3:
                x = jnp.reshape(x, (flat,) + x.shape[-3:])
            return x

        query = jnp.reshape(query, (flat, T, N, H))
        key = jnp.reshape(key, (flat, S, K, H))
        value = jnp.reshape(value, (flat, S, K, H))
        out = attention(query, key, value, flatten_logits_like(bias), flatten_logits_like(mask),
                        is_causal=bool(is_causal), **dropout)
        return jnp.reshape(out, batch_shape + (T, N, H))
    return attention(query, key, value, bias, mask, is_causal=bool(is_causal), **dropout)

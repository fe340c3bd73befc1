"""The public entry point, :func:`attention`, and implementation selection."""

from __future__ import annotations

import jax

from jax_mfa import _native, _primitives, _xla
from jax_mfa._arguments import prepare

# Largest head dim each implementation accepts (None: no limit).
MAX_HEAD_DIM = {"cpu": 512, "xla": None}


def available_implementations() -> tuple[str, ...]:
    """Names of the implementations usable on this machine, best first."""
    names = []
    if "cpu" in _native.registered_backends():
        names.append("cpu")
    names.append("xla")
    return tuple(names)


def _resolve(implementation: str | None) -> str:
    available = available_implementations()
    if implementation is None:
        return available[0]
    if not isinstance(implementation, str):
        raise TypeError(f"implementation must be a string or None, got {implementation!r}")
    if implementation not in available:
        known = sorted(set(MAX_HEAD_DIM) | {"metal", "metal-emulated"})
        if implementation not in known:
            raise ValueError(f"unknown implementation {implementation!r}; expected one of {known}")
        raise ValueError(f"implementation {implementation!r} is not available on this machine; "
                         f"available: {available}")
    return implementation


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
              softcap=None, return_residual=False, implementation=None):
    """Exact scaled dot-product attention through fused kernels.

    Follows ``jax.nn.dot_product_attention``'s layout: query ``(B, T, N, H)`` or
    ``(T, N, H)``; key and value ``(B, S, K, H)`` or ``(S, K, H)`` with
    ``N % K == 0`` (query head n uses key/value head ``n // (N // K)``).

    Logits are ``scale * q.k`` (default ``1/sqrt(H)``), then
    ``softcap * tanh(logits / softcap)`` if ``softcap``, then ``+ bias``
    (broadcastable to ``(B, N, T, S)``). Keys are then masked by ``mask``
    (bool, True = attend), ``is_causal`` (top-left aligned: query i sees keys
    j <= i), ``local_window_size`` (int or ``(left, right)``: key j allowed iff
    ``i - left <= j <= i + right``) and the ``query_seq_lengths`` /
    ``key_value_seq_lengths`` (int32 ``(B,)``). The softmax runs in float32
    (float64 for float64 inputs). A query row with no allowed key gives output
    0, logsumexp -inf and zero gradients (``jax.nn`` instead averages all values).

    Args:
      return_residual: also return the logsumexp, float32 ``(B, T, N)``
        (``(T, N)`` for 3-D inputs; float64 for float64 inputs), natural log.
      implementation: None (best available), "cpu", "xla", or once available
        "metal" / "metal-emulated"; see :func:`available_implementations`.

    Returns:
      The output, with query's shape and dtype; ``(out, lse)`` with
      ``return_residual=True``.
    """
    impl = _resolve(implementation)
    ops, options, was_3d = prepare(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, softcap=softcap,
        max_head_dim=MAX_HEAD_DIM.get(impl))
    if impl == "xla" or (implementation is None and jax.default_backend() != "cpu"):
        out, lse = _xla.attention(ops, options)
    else:
        out, lse = _primitives.attention(ops, options, impl)
    if was_3d:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out

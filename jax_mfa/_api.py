"""The public entry point, :func:`attention`, and implementation selection."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from jax_mfa import _native, _primitives, _xla
from jax_mfa._arguments import prepare

# Largest head dim each implementation accepts (None: no limit).
MAX_HEAD_DIM = {"cpu": 512, "xla": None, "metal": 256, "metal-emulated": 256}

# Storage dtypes each implementation cannot run (Metal has no float64).
UNSUPPORTED_DTYPES = {"metal": ("float64",), "metal-emulated": ("float64",)}

# implementation=None picks "metal" only when B*N*T*S reaches this: below it
# the GPU launch and buffer overheads outweigh the work, and "cpu" is faster.
METAL_MIN_WORK = 1 << 20


def available_implementations() -> tuple[str, ...]:
    """Names of the implementations usable on this machine, best first."""
    names = []
    registered = _native.registered_backends()
    if "metal" in registered and _native.metal_diagnostics()[0]:
        names.append("metal")
    if "cpu" in registered:
        names.append("cpu")
    names.append("xla")
    # A slow verification path (the Metal kernels on the emulator): never the default.
    if "metal-emulated" in registered:
        names.append("metal-emulated")
    return tuple(names)


def implementation_diagnostics() -> dict[str, str | None]:
    """Why each implementation is unavailable on this machine (None: available).

    The companion of :func:`available_implementations`; for "metal" the reason
    names the step that failed (no backend in this build, no Apple7+ GPU, or
    the Metal compiler rejected the kernels, with its message).
    """
    registered = _native.registered_backends()
    load_error = _native.load_error()
    reasons: dict[str, str | None] = {}
    metal_ok, metal_reason, _ = _native.metal_diagnostics()
    reasons["metal"] = None if metal_ok else (metal_reason or "unavailable")
    for name in ("cpu", "metal-emulated"):
        reasons[name] = (None if name in registered else
                         load_error or f"this build of the extension has no {name!r} backend")
    reasons["xla"] = None
    return reasons


@functools.cache
def _warn_metal_fallback(reason: str) -> None:
    # Once per process (and reason): a Mac build whose GPU path is unusable.
    warnings.warn(f"jax_mfa: the Metal backend is unavailable ({reason}); "
                  f"implementation=None uses 'cpu' instead", RuntimeWarning, stacklevel=4)


def _resolve(implementation: str | None, work: int | None = None) -> str:
    available = available_implementations()
    if implementation is None:
        if "metal" in _native.registered_backends() and available[0] != "metal":
            _warn_metal_fallback(implementation_diagnostics()["metal"])
        if available[0] == "metal" and work is not None and work < METAL_MIN_WORK:
            return available[1]
        return available[0]
    if not isinstance(implementation, str):
        raise TypeError(f"implementation must be a string or None, got {implementation!r}")
    if implementation not in available:
        known = sorted(set(MAX_HEAD_DIM) | {"metal", "metal-emulated"})
        if implementation not in known:
            raise ValueError(f"unknown implementation {implementation!r}; expected one of {known}")
        reason = implementation_diagnostics().get(implementation)
        raise ValueError(f"implementation {implementation!r} is not available on this machine "
                         f"({reason}); available: {available}")
    return implementation


def _work(query, key) -> int | None:
    """B*N*T*S of a call (for the small-problem rule of _resolve); 0 for
    float64, which Metal cannot run."""
    if getattr(query, "dtype", None) == jnp.float64:
        return 0
    try:
        *lead_q, T, N, _ = query.shape
        S = key.shape[-3]
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return (lead_q[0] if lead_q else 1) * N * T * S


def attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
              query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
              softcap=None, query_segment_ids=None, key_value_segment_ids=None, sinks=None,
              dropout_rate=0.0, dropout_rng=None, return_residual=False, implementation=None,
              _dropout_broadcast=False):
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

    Features ``jax.nn`` does not have:

    * ``query_segment_ids`` int32 ``(B, T)`` / ``key_value_segment_ids`` int32
      ``(B, S)`` (``(T,)``/``(S,)`` for 3-D inputs), both or neither: packed
      sequences. Key j is allowed for query i only if their ids are equal (ANDed
      with every mask above). Any values; sorted ids (the usual packing) let the
      kernels skip tiles whose id ranges cannot match. No gradient.
    * ``sinks`` float ``(N,)``: one extra logit per query head in every row's
      softmax, taking probability mass but adding no value:
      ``p_j = exp(l_j) / (exp(sinks[n]) + sum_allowed exp(l_k))``. The lse
      includes it; a row with no allowed key gives output 0 and lse ``sinks[n]``.
      Differentiable (summed over batch and queries).
    * ``dropout_rate`` in ``[0, 1)`` with ``dropout_rng`` (a JAX PRNG key,
      required when the rate is positive): dropout on the probabilities after
      the softmax, kept entries scaled by ``1 / (1 - rate)``. Entry (b, n, i, j)
      is kept iff Philox4x32-10 (keyed by the key's bits, counter
      ``(j // 4, i, n, b)``, word ``j % 4``) gives a word >= ``round(rate * 2**32)``:
      every implementation draws the same mask for the same key. The backward
      recomputes it; nothing is stored.

    Args:
      return_residual: also return the logsumexp, float32 ``(B, T, N)``
        (``(T, N)`` for 3-D inputs; float64 for float64 inputs), natural log.
      _dropout_broadcast: private (the Flax adapter's broadcast_dropout): one
        dropout mask shared by every batch row and head (drawn as for b = n = 0).
      implementation: None (best available), "cpu", "xla", or once available
        "metal" / "metal-emulated"; see :func:`available_implementations`.

    Returns:
      The output, with query's shape and dtype; ``(out, lse)`` with
      ``return_residual=True``.
    """
    impl = _resolve(implementation, _work(query, key))
    dtype_name = getattr(getattr(query, "dtype", None), "name", None)
    if dtype_name in UNSUPPORTED_DTYPES.get(impl, ()):
        raise ValueError(f"implementation {impl!r} does not support {dtype_name} inputs; "
                         f"use float32, float16 or bfloat16, or implementation='cpu'")
    ops, options, was_3d = prepare(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, softcap=softcap,
        max_head_dim=MAX_HEAD_DIM.get(impl), query_segment_ids=query_segment_ids,
        key_value_segment_ids=key_value_segment_ids, sinks=sinks, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, dropout_broadcast=_dropout_broadcast)
    if impl == "xla" or (implementation is None and jax.default_backend() != "cpu"):
        out, lse = _xla.attention(ops, options)
    else:
        out, lse = _primitives.attention(ops, options, impl)
    if was_3d:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out

"""The public entry point, :func:`attention`, and implementation selection."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from jax_mfa import _blockwise, _jax_nn, _native, _primitives, _xla
from jax_mfa._arguments import as_array, describe, prepare

# Largest head dim each implementation accepts (None: no limit).
MAX_HEAD_DIM = {"cpu": 512, "xla": None, "xla-blockwise": None, "metal": 256,
                "metal-emulated": 256}

# Plain-JAX implementations (every platform); the others are fused kernels.
JAX_IMPLEMENTATIONS = ("xla", "xla-blockwise")

# Which path the last call traced under a non-CPU platform took (diagnostics
# for tests and benchmarks/bench_gpu.py): "jax.nn (cudnn)", "jax.nn (xla)",
# "xla" or "xla-blockwise".
last_route: str | None = None

# Storage dtypes each implementation cannot run (Metal has no float64).
UNSUPPORTED_DTYPES = {"metal": ("float64",), "metal-emulated": ("float64",)}

# implementation=None picks "metal" only when B*N*T*S reaches this: below it
# the GPU launch and buffer overheads outweigh the work, and "cpu" is faster.
METAL_MIN_WORK = 1 << 20


def available_implementations() -> tuple[str, ...]:
    """Names of the implementations usable on this machine, best first."""
    names = []
    registered = _native.registered_backends()
    ext = _native.extension()
    if "metal" in registered and ext is not None and ext.metal_available():
        names.append("metal")
    if "cpu" in registered:
        names.append("cpu")
    names.extend(JAX_IMPLEMENTATIONS)
    # A slow verification path (the Metal kernels on the emulator): never the default.
    if "metal-emulated" in registered:
        names.append("metal-emulated")
    return tuple(names)


def _resolve(implementation: str | None, work: int | None = None) -> str:
    available = available_implementations()
    if implementation is None:
        if available[0] == "metal" and work is not None and work < METAL_MIN_WORK:
            return available[1]
        return available[0]
    if not isinstance(implementation, str):
        raise TypeError(f"implementation must be a string or None, got {describe(implementation)}")
    if implementation not in available:
        known = sorted(set(MAX_HEAD_DIM) | {"metal", "metal-emulated"})
        if implementation not in known:
            raise ValueError(f"unknown implementation {implementation!r}; expected one of {known}")
        raise ValueError(f"implementation {implementation!r} is not available on this machine; "
                         f"available: {available}")
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


@contextlib.contextmanager
def _forward_mode_errors(impl: str):
    """JAX's error for jax.jvp of a custom-VJP function, naming jax_mfa instead."""
    try:
        yield
    except TypeError as e:
        if "forward-mode" not in str(e) or "custom_vjp" not in str(e):
            raise
        raise NotImplementedError(_primitives.FORWARD_MODE_MESSAGE.format(impl=impl)) from None


def default_platform() -> str:
    """The JAX platform calls run on by default ("cpu", "gpu", "tpu", ...)."""
    return jax.default_backend()


def _non_cpu_attention(ops, options, return_residual: bool):
    """implementation=None under a GPU/TPU platform: jax.nn (cuDNN where it
    applies) when it computes the same thing, else the materialising "xla" path
    for small problems and the blockwise one for the rest."""
    global last_route
    if _jax_nn.agrees(options, return_residual):
        routed = _jax_nn.attention(ops, options)
        if routed is not None:
            last_route = routed[1]
            return routed[0], None
    if _jax_nn.scores_bytes(ops) <= _jax_nn.XLA_SCORES_MAX_BYTES:
        last_route = "xla"
        return _xla.attention(ops, options)
    last_route = "xla-blockwise"
    return _blockwise.attention(ops, options)


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
      implementation: None (best available; on GPUs and TPUs jax.nn /
        cuDNN where its semantics agree, see the README), "cpu", "xla",
        "xla-blockwise" (FlashAttention in plain JAX, any platform), or where
        available "metal" / "metal-emulated"; see :func:`available_implementations`.

    Forward-mode autodiff and second derivatives are not supported except with
    implementation="xla". NaN propagates as in jax.nn (an allowed NaN logit
    makes its row NaN).

    Returns:
      The output, with query's shape and dtype; ``(out, lse)`` with
      ``return_residual=True``.
    """
    query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths = (
        as_array(x, name) for x, name in (
            (query, "query"), (key, "key"), (value, "value"), (bias, "bias"), (mask, "mask"),
            (query_seq_lengths, "query_seq_lengths"),
            (key_value_seq_lengths, "key_value_seq_lengths")))
    routed = implementation is None and default_platform() != "cpu"
    impl = "xla-blockwise" if routed else _resolve(implementation, _work(query, key))
    dtype_name = getattr(getattr(query, "dtype", None), "name", None)
    if dtype_name in UNSUPPORTED_DTYPES.get(impl, ()):
        raise ValueError(f"implementation {impl!r} does not support {dtype_name} inputs; "
                         f"use float32, float16 or bfloat16, or implementation='cpu'")
    ops, options, was_3d = prepare(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, softcap=softcap,
        max_head_dim=MAX_HEAD_DIM.get(impl))
    with _forward_mode_errors(impl):
        if routed:
            out, lse = _non_cpu_attention(ops, options, return_residual)
        elif impl == "xla":
            out, lse = _xla.attention(ops, options)
        elif impl == "xla-blockwise":
            out, lse = _blockwise.attention(ops, options)
        else:
            out, lse = _primitives.attention(ops, options, impl)
    if was_3d:
        out = out[0]
        lse = None if lse is None else lse[0]
    return (out, lse) if return_residual else out

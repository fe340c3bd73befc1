"""The public entry point, :func:`attention`, and implementation selection."""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_mfa import _blockwise, _jax_nn, _native, _primitives, _ring, _xla
from jax_mfa._arguments import NUM_OPERANDS, Operands, accumulation_dtype, as_array, describe, prepare

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
    if "metal" in registered and _native.metal_diagnostics()[0]:
        names.append("metal")
    if "cpu" in registered:
        names.append("cpu")
    names.extend(JAX_IMPLEMENTATIONS)
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
    for name in JAX_IMPLEMENTATIONS:
        reasons[name] = None
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
        raise TypeError(f"implementation must be a string or None, got {describe(implementation)}")
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


def _setup(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths, *,
           implementation, key_columns=None, **options):
    """(implementation, routed, operands, options, was_3d): the arguments checked.
    `routed`: implementation=None under a non-CPU platform, where the fused
    kernels do not run (see _non_cpu_attention)."""
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
    ops, opts, was_3d = prepare(
        query, key, value, bias, mask, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, key_columns=key_columns,
        max_head_dim=MAX_HEAD_DIM.get(impl), **options)
    return impl, routed, ops, opts, was_3d


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
    impl, routed, ops, options, was_3d = _setup(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        scale=scale, is_causal=is_causal, local_window_size=local_window_size,
        softcap=softcap, implementation=implementation, query_segment_ids=query_segment_ids,
        key_value_segment_ids=key_value_segment_ids, sinks=sinks, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, dropout_broadcast=_dropout_broadcast)
    with _forward_mode_errors(impl):
        if routed:
            out, lse = _non_cpu_attention(ops, options, return_residual)
        else:
            out, lse = call_implementation(impl, ops, options)
    if was_3d:
        out = out[0]
        lse = None if lse is None else lse[0]
    return (out, lse) if return_residual else out


def call_implementation(impl: str, ops: Operands, options) -> tuple:
    """(out, lse) of checked operands on implementation `impl` (differentiable)."""
    if impl == "xla":
        return _xla.attention(ops, options)
    if impl == "xla-blockwise":
        return _blockwise.attention(ops, options)
    return _primitives.attention(ops, options, impl)


# ----------------------------------------------------------------------------
# Ring attention under shard_map


def ring_attention(query, key, value, bias=None, mask=None, *, axis_name, scale=None,
                   is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                   local_window_size=None, softcap=None, query_segment_ids=None,
                   key_value_segment_ids=None, sinks=None, dropout_rate=0.0, dropout_rng=None,
                   return_residual=False, implementation=None):
    """:func:`attention` over a sequence sharded along the mesh axis (or axes)
    ``axis_name``, called inside ``jax.shard_map``: ring attention.

    Each device passes its query rows ``(B, T/n, N, H)`` and its key/value rows
    ``(B, S/n, K, H)``: device i holds rows ``[i*T/n, (i+1)*T/n)`` of the
    sequence (the blocks of ``P(None, axis_name)``). Key/value blocks travel
    around the ring; no device ever holds the whole sequence. Causal attention
    with T == S is load-balanced (zigzag; the rows are exchanged internally,
    inputs and outputs stay in the contiguous layout). All options mean what
    they mean for the whole sequence: ``is_causal``, ``local_window_size`` and
    the lengths (int32 ``(B,)``, the same on every device) use absolute
    positions. ``bias``/``mask`` are broadcastable to ``(B, N, T/n, S)``: this
    device's query rows against all keys. Other shard_map axes (batch, heads)
    just see local arrays. Gradients flow through a ring backward pass.

    ``query_segment_ids`` / ``key_value_segment_ids`` are this device's rows
    ``(B, T/n)`` / ``(B, S/n)`` (they travel with the key/value blocks);
    ``sinks`` ``(N,)`` are folded into the final merge. Dropout
    (``dropout_rate``, ``dropout_rng``) draws the mask of the whole sequence:
    the same as :func:`attention` on the unsharded rows with the same key.
    Along other shard_map axes the batch rows and heads are the local ones
    (every batch or head shard draws the mask of local index 0, 1, ...): fold
    those axes' ``jax.lax.axis_index`` into ``dropout_rng`` for distinct masks.

    Returns this device's rows of the output (and of the lse with
    ``return_residual=True``).
    """
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    try:
        size = jax.lax.axis_size(axes)
    except NameError as e:
        raise ValueError(f"axis_name {axis_name!r} is not a mesh axis of the enclosing "
                         "shard_map") from e
    key_rows = jnp.shape(key)[-3] if jnp.ndim(key) >= 3 else 0
    impl, _, ops, options, was_3d = _setup(
        query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
        scale=scale, is_causal=is_causal, local_window_size=local_window_size,
        softcap=softcap, implementation=implementation, key_columns=size * key_rows,
        query_segment_ids=query_segment_ids, key_value_segment_ids=key_value_segment_ids,
        sinks=sinks, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    ops = Operands(*_vary(ops.as_tuple(), axes))
    ring = _ring.Ring.make(axes, size, ops.query.shape[1], ops.key.shape[1], options)
    out, lse = _ring_attention(*ops.as_tuple(), options, impl, ring)
    if was_3d:
        out, lse = out[0], lse[0]
    return (out, lse) if return_residual else out


def _kernels(impl: str) -> _ring.Kernels:
    if impl == "xla":
        return _ring.Kernels(lambda options, *a: _xla.attention(Operands(*a), options),
                             lambda options, *a: _xla.backward(Operands(*a[:NUM_OPERANDS]),
                                                               options, *a[NUM_OPERANDS:]))
    if impl == "xla-blockwise":
        return _ring.Kernels(lambda options, *a: _blockwise.forward(Operands(*a), options),
                             lambda options, *a: _blockwise.backward(
                                 Operands(*a[:NUM_OPERANDS]), options, *a[NUM_OPERANDS:]))

    def bind(primitive):
        return lambda options, *a: tuple(primitive.bind(*a, options=options, backend=impl))

    return _ring.Kernels(bind(_primitives.attention_fwd_p), bind(_primitives.attention_bwd_p))


def _vary(arrays, axes=()):
    """The arrays cast to vary over the same manual (shard_map) axes: the
    union of theirs and `axes`. The casts' transposes sum the cotangents of
    operands shared by several devices (a replicated bias, the lengths)."""
    sets = [_primitives._varying_axes(a) for a in arrays]
    union = frozenset(axes).union(*sets)
    return tuple(a if s == union else jax.lax.pcast(a, tuple(union - s), to="varying")
                 for a, s in zip(arrays, sets))


def _vary_like(ref):
    """Makes arrays created in the ring vary over the same axes as `ref`."""
    axes = _primitives._varying_axes(ref)
    return lambda x: _vary((x,), axes)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(NUM_OPERANDS, NUM_OPERANDS + 1,
                                                    NUM_OPERANDS + 2))
def _ring_attention(*args):
    *ops, options, impl, ring = args
    return _ring.forward(_kernels(impl), ring, options, Operands(*ops), _vary_like(ops[0]))


def _ring_fwd(*args):
    out, lse = _ring_attention(*args)
    return (out, lse), (*args[:NUM_OPERANDS], out, lse)


def _ring_bwd(options, impl, ring, residuals, cotangents):
    *args, out, lse = residuals
    ops = Operands(*args)
    dout, dlse = cotangents
    acc = accumulation_dtype(out.dtype)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
    grads = _ring.backward(_kernels(impl), ring, options, ops, lse, dout.astype(out.dtype),
                           delta, _vary_like(out))
    dsinks = (_xla.sinks_gradient(ops.sinks, lse, delta).astype(ops.sinks.dtype)
              if options.has_sinks else jnp.zeros_like(ops.sinks))
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return grads + (zero(ops.mask), zero(ops.q_lengths), zero(ops.kv_lengths),
                    zero(ops.q_segments), zero(ops.kv_segments), dsinks,
                    zero(ops.dropout_seed))


_ring_attention.defvjp(_ring_fwd, _ring_bwd)

"""JAX primitives for the fused kernels: abstract evaluation, lowering to the
FFI targets, batching (vmap) rules, and the custom VJP that ties forward and
backward together.

Two primitives, one per kernel pass:
  attention_fwd: (q, k, v, bias, mask, q_lengths, kv_lengths, q_segments,
                  kv_segments, sinks, dropout_seed) -> (out, lse)
  attention_bwd: (..., lse, dout, delta) -> (dq, dk, dv, dbias)
Their static parameters are ``options`` (an :class:`Options`) and ``backend``
(the FFI target suffix, e.g. "cpu"). On platforms without the fused kernels
(cuda, rocm, tpu) both lower to the blockwise JAX implementation instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mfa import _blockwise, _jax_compat, _native, _sharding
from jax_mfa._xla import sinks_gradient

from jax_mfa._arguments import NUM_OPERANDS, Operands, Options, accumulation_dtype

attention_fwd_p = Primitive("jax_mfa_attention_fwd")
attention_fwd_p.multiple_results = True
attention_bwd_p = Primitive("jax_mfa_attention_bwd")
attention_bwd_p.multiple_results = True


# ----------------------------------------------------------------------------
# Abstract evaluation


def _like(ref, shape, dtype):
    """Abstract value of the given shape and dtype that varies over the same
    shard_map axes as `ref` (all operands are made to agree, see below)."""
    mat = getattr(ref, "mat", None)
    if mat is None:
        return jax.core.ShapedArray(shape, dtype)
    return jax.core.ShapedArray(shape, dtype,
                                sharding=NamedSharding(jax.sharding.get_abstract_mesh(), P()),
                                manual_axis_type=mat)




def _fwd_abstract(q, *operands, options, backend):
    B, T, N, _ = q.shape
    return (_like(q, q.shape, q.dtype), _like(q, (B, T, N), accumulation_dtype(q.dtype)))


def _bwd_abstract(q, k, v, bias, *operands, options, backend):
    return tuple(_like(q, a.shape, a.dtype) for a in (q, k, v, bias))


attention_fwd_p.def_abstract_eval(_fwd_abstract)
attention_bwd_p.def_abstract_eval(_bwd_abstract)


@functools.cache
def _compiled(primitive, options: Options, backend: str):
    return jax.jit(functools.partial(primitive.bind, options=options, backend=backend))


# Eager calls compile the primitive alone, as JAX's own primitives do.
for _p in (attention_fwd_p, attention_bwd_p):
    _p.def_impl(functools.partial(lambda p, *args, options, backend:
                                  _compiled(p, options, backend)(*args), _p))


FORWARD_MODE_MESSAGE = (
    "jax_mfa.attention with implementation={impl!r} supports reverse-mode "
    "differentiation once (jax.grad, jax.vjp, jax.jacrev); forward mode (jax.jvp, "
    "jax.jacfwd, jax.linearize) and second derivatives (jax.hessian, grad of grad) are "
    "not supported. Use implementation=\"xla\" for those (plain JAX operations, "
    "differentiable to any order).")


def _no_forward_mode(primitive):
    def jvp(primals, tangents, *, options, backend):
        raise NotImplementedError(FORWARD_MODE_MESSAGE.format(impl=backend))
    ad.primitive_jvps[primitive] = jvp


# The custom VJP differentiates the forward; the primitives themselves are
# only reached by forward mode or a second derivative: say so clearly.
_no_forward_mode(attention_fwd_p)
_no_forward_mode(attention_bwd_p)

# ----------------------------------------------------------------------------
# Lowering: FFI targets on the CPU platform (where jax_mfa's kernels run, also
# the Metal ones, which read XLA's host buffers); the XLA path elsewhere.


def _kernel_call(kind: str, options: Options, backend: str, *args):
    """The FFI call itself, on whatever (per-device) shapes it is given."""
    abstract = _fwd_abstract if kind == "fwd" else _bwd_abstract
    results = [jax.ShapeDtypeStruct(a.shape, a.dtype)
               for a in abstract(*args, options=options, backend=backend)]
    call = jax.ffi.ffi_call(_native.ffi_target(kind, backend), results)
    return tuple(call(*args, **options.ffi_attributes()))


# On several devices the kernels run per shard (custom partitioning, see
# jax_mfa/_sharding.py); on one device this is just the FFI call.
_partitioned_call = _sharding.partitioned(_kernel_call)


def _ffi_lowering(kind: str):
    def lowering(ctx, *args, options, backend):
        # Partitioning only matters when the computation spans several devices.
        devices = getattr(ctx.module_context.axis_context, "device_assignment", ())
        single = devices is None or (devices != () and len(devices) <= 1)
        call = _kernel_call if single else _partitioned_call
        return mlir.lower_fun(functools.partial(call, kind, options, backend),
                              multiple_results=True)(ctx, *args)

    return lowering


_fwd_lowering = _ffi_lowering("fwd")
_bwd_lowering = _ffi_lowering("bwd")
# Custom partitioning needs to know the devices while lowering.
_jax_compat.require_devices_during_lowering(attention_fwd_p, attention_bwd_p)


def _blockwise_fwd(*operands, options, backend):
    del backend
    return _blockwise.forward(Operands(*operands), options)


def _blockwise_bwd(*args, options, backend):
    del backend
    lse, dout, delta = args[NUM_OPERANDS:]
    return _blockwise.backward(Operands(*args[:NUM_OPERANDS]), options, lse, dout, delta)


mlir.register_lowering(attention_fwd_p, _fwd_lowering, platform="cpu")
mlir.register_lowering(attention_bwd_p, _bwd_lowering, platform="cpu")
for _platform in ("cuda", "rocm", "tpu"):
    mlir.register_lowering(attention_fwd_p,
                           mlir.lower_fun(_blockwise_fwd, multiple_results=True),
                           platform=_platform)
    mlir.register_lowering(attention_bwd_p,
                           mlir.lower_fun(_blockwise_bwd, multiple_results=True),
                           platform=_platform)

# ----------------------------------------------------------------------------
# Batching: vmapped axes fold into the kernels' batch dim B.


NOT_MAPPED = None  # batch dim of an operand vmap does not map over


def _fold(x, dim, size: int, batch: int, keep_broadcast: bool):
    """Folds vmap axis `dim` of x (leading dim: batch or 1) into its leading dim,
    giving size * batch rows in (vmap index, batch index) order. An unbatched
    operand whose leading dim is 1 may stay as it is (`keep_broadcast`): the
    kernels broadcast it over every batch row with stride 0."""
    if dim is NOT_MAPPED:
        if keep_broadcast and x.shape[0] == 1:
            return x
        x = jnp.broadcast_to(x[None], (size,) + x.shape)
    else:
        x = jnp.moveaxis(x, dim, 0)
    if x.shape[1] != batch:
        x = jnp.broadcast_to(x, (size, batch) + x.shape[2:])
    return x.reshape((size * batch,) + x.shape[2:])


def _unfold(x, size: int):
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _batch_size(args, dims) -> int:
    """The vmap size, from any mapped operand (for the backward this may be the
    cotangent alone: jax.jacrev, or vmap over a vjp function)."""
    return next(a.shape[d] for a, d in zip(args, dims) if d is not NOT_MAPPED)


def _leading_dim(x, dim) -> int:
    """Size of x's first dim, not counting the vmapped axis `dim`."""
    shape = list(x.shape)
    if dim is not NOT_MAPPED:
        del shape[dim]
    return shape[0]


def _fold_operands(args, dims, size: int, options: Options, *, bias_per_example: bool):
    q, k, v, bias, mask, q_lengths, kv_lengths, q_segments, kv_segments, sinks, seed = args
    B = _leading_dim(q, dims[0])
    fold = functools.partial(_fold, size=size, batch=B)
    folded = [
        fold(q, dims[0], keep_broadcast=False),
        fold(k, dims[1], keep_broadcast=False),
        fold(v, dims[2], keep_broadcast=False),
        fold(bias, dims[3], keep_broadcast=not (options.has_bias and bias_per_example)),
        fold(mask, dims[4], keep_broadcast=True),
        fold(q_lengths, dims[5], keep_broadcast=not options.has_q_lengths),
        fold(kv_lengths, dims[6], keep_broadcast=not options.has_kv_lengths),
        fold(q_segments, dims[7], keep_broadcast=not options.has_segment_ids),
        fold(kv_segments, dims[8], keep_broadcast=not options.has_segment_ids),
        fold(sinks, dims[9], keep_broadcast=True),  # (1, N) is shared by every row
        fold(seed, dims[10], keep_broadcast=options.dropout_rate == 0),
    ]
    return folded, B


def _fwd_batch(args, dims, *, options, backend):
    size = _batch_size(args, dims)
    folded, _ = _fold_operands(args, dims, size, options, bias_per_example=False)
    out, lse = attention_fwd_p.bind(*folded, options=options, backend=backend)
    return (_unfold(out, size), _unfold(lse, size)), (0, 0)


def _bwd_batch(args, dims, *, options, backend):
    n = NUM_OPERANDS
    size = _batch_size(args, dims)
    folded, B = _fold_operands(args[:n], dims[:n], size, options, bias_per_example=True)
    extra = [_fold(a, d, size, B, keep_broadcast=False) for a, d in zip(args[n:], dims[n:])]
    dq, dk, dv, dbias = attention_bwd_p.bind(*folded, *extra, options=options, backend=backend)
    if not options.has_bias:
        dbias_dim = NOT_MAPPED  # placeholder output
    else:
        # The bias was expanded to one copy per (vmap index, batch row) so each
        # vmap index gets its own gradient; sum back over what was broadcast.
        dbias = _unfold(dbias, size)
        if _leading_dim(args[3], dims[3]) == 1 and B > 1:
            dbias = jnp.sum(dbias, axis=1, keepdims=True)
        dbias_dim = 0
    return ((_unfold(dq, size), _unfold(dk, size), _unfold(dv, size), dbias),
            (0, 0, 0, dbias_dim))


batching.primitive_batchers[attention_fwd_p] = _fwd_batch
batching.primitive_batchers[attention_bwd_p] = _bwd_batch

# ----------------------------------------------------------------------------
# Autodiff: a custom VJP over the two primitives. Residuals are the inputs, the
# output and the logsumexp -- never the probabilities.


def _varying_axes(x) -> frozenset:
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def attention(operands: Operands, options: Options, backend: str):
    """(out, lse) from the fused kernels of `backend`, differentiable."""
    args = operands.as_tuple()
    # Inside shard_map, operands may vary over different manual axes (e.g. a
    # mask made inside the body). Cast all to the union, as JAX's own
    # operations do; the cast's transpose sums the cotangents it must.
    axes = [_varying_axes(a) for a in args]
    union = frozenset().union(*axes)
    args = [a if s == union else jax.lax.pcast(a, tuple(union - s), to="varying")
            for a, s in zip(args, axes)]
    return fused_attention(*args, options, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(NUM_OPERANDS, NUM_OPERANDS + 1))
def fused_attention(*args):
    """(out, lse) from the fused kernels: args are the operands (Operands.as_tuple()),
    then options and backend."""
    *operands, options, backend = args
    return tuple(attention_fwd_p.bind(*operands, options=options, backend=backend))


def _vjp_fwd(*args):
    *operands, options, backend = args
    out, lse = attention_fwd_p.bind(*operands, options=options, backend=backend)
    return (out, lse), (*operands, out, lse)



def _vjp_bwd(options, backend, residuals, cotangents):
    operands, (out, lse) = residuals[:NUM_OPERANDS], residuals[NUM_OPERANDS:]
    q, k, v, bias, mask, q_lengths, kv_lengths, q_segments, kv_segments, sinks, seed = operands
    dout, dlse = cotangents
    acc = accumulation_dtype(q.dtype)
    # The lse cotangent enters only through delta = rowsum(dO * O) - dlse.
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
    dq, dk, dv, dbias = attention_bwd_p.bind(*operands, lse, dout.astype(q.dtype), delta,
                                             options=options, backend=backend)
    if not options.has_bias:
        dbias = jnp.zeros_like(bias)
    dsinks = sinks_gradient(sinks, lse, delta) if options.has_sinks else jnp.zeros_like(sinks)
    zero_int = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq, dk, dv, dbias, zero_int(mask), zero_int(q_lengths), zero_int(kv_lengths),
            zero_int(q_segments), zero_int(kv_segments), dsinks.astype(sinks.dtype),
            zero_int(seed))


fused_attention.defvjp(_vjp_fwd, _vjp_bwd)

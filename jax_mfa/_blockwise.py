"""The "xla-blockwise" implementation: FlashAttention written in plain JAX.

Queries go in blocks of up to ``QUERY_BLOCK`` rows (an outer loop) and keys
stream by in blocks of ``KEY_BLOCK`` with an online softmax (an inner loop), so
at most one (rows x keys) block of scores exists at a time: memory is O(T + S)
per head. The backward pass recomputes the probabilities from the saved
logsumexp (a custom VJP, residuals: inputs, output, lse), as the fused kernels
do. It runs on every JAX platform: it is what jax_mfa uses on GPUs and TPUs
where ``jax.nn.dot_product_attention`` cannot express a call with jax_mfa's
semantics, and what the fused primitives lower to there.

Segment ids, sinks and dropout follow the fused kernels: segment ids AND
into the mask of each block, the online softmax starts from the sink (m = sink,
l = 1), and each block draws its dropout factors from the shared generator at
absolute positions, in the forward and again in the backward.

Key blocks that no row of a query block may see are skipped, forward and
backward: causal and window bounds limit the key loop's range; lengths and
segment ids (a block whose id range cannot meet the rows' id range in any
batch row: with sorted ids, every block away from the diagonal's segments) skip
a block through ``lax.cond``. With any of these masks, query blocks are at most
``SKIPPING_QUERY_BLOCK`` rows on the CPU, so that the skipping has a grain finer
than the whole sequence. (Under ``jax.vmap`` over the lengths or ids, JAX turns the
cond into a select: still exact, but nothing is skipped.)

Blocks are never padded: a last, partial block is read from ``S - block``
instead, and the keys (rows, in the backward) it shares with the previous block
are masked out of it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_mfa import _xla
from jax_mfa._arguments import NUM_OPERANDS, Operands, Options, accumulation_dtype

# Block sizes (upper bounds). A query block is further limited so that one
# block of float32 scores stays within SCORES_BUDGET bytes.
QUERY_BLOCK = 4096
KEY_BLOCK = 512
SCORES_BUDGET = 256 << 20
# Query block limit when blocks can be skipped (causal, windows, lengths,
# segment ids): a key block is skipped only when no row of the query block can
# see it (2 loaded CPU cores, T = 4096, N = 4, H = 64, causal forward: 0.6 s
# with 512 rows, 1.4 s with 4096). CPU only: on an H200 the wide blocks were
# faster (causal bf16 T=S=32768, N=16, H=128 forward: 202 ms with 4096 rows,
# 292 ms with 512; benchmarks/bench_gpu.py).
SKIPPING_QUERY_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class _Blocks:
    rows: int  # query positions per block
    keys: int  # keys per block
    T: int
    S: int

    @property
    def num_row_blocks(self) -> int:
        return -(-self.T // self.rows)

    def start(self, index, size: int, total: int):
        """First position read for block `index` (the last block is shifted
        back so that it ends at `total`; nothing is padded)."""
        return jnp.minimum(index * size, total - size)


def _blocks(opt: Options, B: int, N: int, T: int, S: int) -> _Blocks:
    keys = max(1, min(S, KEY_BLOCK))
    skipping = (opt.is_causal or opt.window_left >= 0 or opt.window_right >= 0
                or opt.has_q_lengths or opt.has_kv_lengths or opt.has_segment_ids)
    skipping = skipping and jax.default_backend() == "cpu"
    query_block = min(QUERY_BLOCK, SKIPPING_QUERY_BLOCK) if skipping else QUERY_BLOCK
    rows = max(1, min(T, query_block, SCORES_BUDGET // (4 * B * N * keys)))
    return _Blocks(rows, keys, T, S)


def _zeros_like(x, dtype=None):
    """Zeros shaped and, under explicit sharding, sharded like x (jax 0.11's
    zeros_like drops an explicit sharding, which the loop updates then reject)."""
    return _sharded_like(jnp.zeros_like(x, dtype), x)


def _sharded_like(x, ref):
    """x resharded as ref where their explicit shardings differ (jax 0.11 gives
    cotangents and fresh arrays no sharding); a no-op without explicit axes."""
    want = jax.typeof(ref).sharding
    if jax.typeof(x).sharding.spec == want.spec:
        return x
    return jax.sharding.reshard(x, want)


def _dot(spec: str, a, b, acc):
    """einsum accumulating in `acc`; float32/float64 products at full precision
    (GPUs would otherwise use TF32)."""
    precision = (lax.Precision.HIGHEST if jnp.dtype(a.dtype).itemsize >= 4
                 or jnp.dtype(b.dtype).itemsize >= 4 else None)
    return jnp.einsum(spec, a, b, preferred_element_type=acc, precision=precision)


def _key_block_range(opt: Options, i0, rows: int, blocks: _Blocks):
    """[first, last) key blocks any of the rows [i0, i0 + rows) may see."""
    lo, hi = 0, blocks.S
    if opt.window_left >= 0:
        lo = jnp.maximum(0, i0 - opt.window_left)
    if opt.is_causal:
        hi = jnp.minimum(hi, i0 + rows)
    if opt.window_right >= 0:
        hi = jnp.minimum(hi, i0 + rows + opt.window_right)
    return lo // blocks.keys, (hi + blocks.keys - 1) // blocks.keys


def _skip_invisible_blocks(ops: Operands, opt: Options, i0, blocks: _Blocks, body):
    """The key loop's body `body(jk, state)`, run only for key blocks that some
    row of the query block at i0 may see by the lengths and segment ids (the
    state passes through unchanged otherwise). The test is conservative: a
    block that is visited may still be all masked, one that is skipped has no
    allowed entry (so skipping changes no result)."""
    if not (opt.has_q_lengths or opt.has_kv_lengths or opt.has_segment_ids):
        return body
    rows, keys = blocks.rows, blocks.keys
    visible = True  # per batch row, from the rows' side
    if opt.has_q_lengths:
        visible = i0 < ops.q_lengths
    if opt.has_segment_ids:
        q_seg = lax.dynamic_slice_in_dim(ops.q_segments, i0, rows, axis=1)
        q_lo, q_hi = jnp.min(q_seg, axis=1), jnp.max(q_seg, axis=1)

    def guarded(jk, state):
        j0 = blocks.start(jk, keys, blocks.S)
        seen = visible
        if opt.has_kv_lengths:
            seen = seen & (j0 < ops.kv_lengths)
        if opt.has_segment_ids:
            kv_seg = lax.dynamic_slice_in_dim(ops.kv_segments, j0, keys, axis=1)
            seen = seen & (q_lo <= jnp.max(kv_seg, axis=1)) & (jnp.min(kv_seg, axis=1) <= q_hi)
        return lax.cond(jnp.any(seen), body, lambda _, unchanged: unchanged, jk, state)

    return guarded


def _slice_broadcast(x, i0, rows: int, j0, keys: int, K: int, G: int):
    """The (rows x keys) block of a (B|1, N|1, T|1, S|1) array, as
    (B|1, K|1, G|1, rows|1, keys|1) to broadcast against grouped scores."""
    if x.shape[2] != 1:
        x = lax.dynamic_slice_in_dim(x, i0, rows, axis=2)
    if x.shape[3] != 1:
        x = lax.dynamic_slice_in_dim(x, j0, keys, axis=3)
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], K, G, *x.shape[2:])


def _logits(ops: Operands, opt: Options, q_blk, i0, row_from, j0, key_from, keys: int, K: int,
            G: int):
    """Logits of a block, (B, K, G, rows, keys), -inf where not allowed, and the
    softcap's tanh (None without softcap). Rows below `row_from` and keys below
    `key_from` belong to the previous block and count as not allowed."""
    acc = accumulation_dtype(q_blk.dtype)
    rows = q_blk.shape[1]
    k_blk = lax.dynamic_slice_in_dim(ops.key, j0, keys, axis=1)
    # The scale goes into q first: multiplied after the product, XLA may fuse the
    # multiplication differently into the max and the exp, and for huge logits
    # (|scale q.k| > ~1e9) the two then disagree by more than exp can take.
    s = _dot("bqkgh,bskh->bkgqs", q_blk.astype(acc) * jnp.asarray(opt.scale, acc), k_blk, acc)
    t = None
    if opt.softcap > 0:
        t = jnp.tanh(s / opt.softcap)
        s = opt.softcap * t
    if opt.has_bias:
        s = s + _slice_broadcast(ops.bias, i0, rows, j0, keys, K, G)
    i = (i0 + jnp.arange(rows))[:, None]
    j = (j0 + jnp.arange(keys))[None, :]
    mask = _slice_broadcast(ops.mask, i0, rows, j0, keys, K, G) if opt.has_mask else None
    q_seg = kv_seg = None
    if opt.has_segment_ids:
        q_seg = lax.dynamic_slice_in_dim(ops.q_segments, i0, rows, axis=1)
        kv_seg = lax.dynamic_slice_in_dim(ops.kv_segments, j0, keys, axis=1)
    allowed = _xla.allowed_at(opt, i, j, ops.q_lengths, ops.kv_lengths, mask, ndim=5,
                              q_segments=q_seg, kv_segments=kv_seg)
    allowed = allowed & (i >= row_from) & (j >= key_from)
    return jnp.where(allowed, s, -jnp.inf), t


def _dropout_factors(ops: Operands, opt: Options, i0, j0, shape, acc):
    """(B, K, G, rows, keys) dropout factors of a block at absolute positions
    (the generator's, as every implementation draws them)."""
    B, K, G, rows, keys = shape
    z = _xla.dropout_factors(ops, opt, (B, K * G, rows, keys), acc, q_start=i0, k_start=j0)
    return z.reshape(shape)


def _sizes(ops: Operands, opt: Options):
    """(B, T, N, H, S, K, G, acc, blocks) of a call."""
    B, T, N, H = ops.query.shape
    S, K = ops.key.shape[1], ops.key.shape[2]
    return (B, T, N, H, S, K, N // K, accumulation_dtype(ops.query.dtype),
            _blocks(opt, B, N, T, S))


def forward(ops: Operands, opt: Options) -> tuple[jax.Array, jax.Array]:
    """(out (B, T, N, H), lse (B, T, N)) without the T x S scores."""
    q, v = ops.query, ops.value
    B, T, N, H, S, K, G, acc, blocks = _sizes(ops, opt)
    R, C = blocks.rows, blocks.keys
    qg = q.reshape(B, T, K, G, H)

    def row_block(iq, carry):
        out, lse = carry
        i0 = blocks.start(iq, R, T)
        q_blk = lax.dynamic_slice_in_dim(qg, i0, R, axis=1)

        def key_block(jk, state):
            m, l, o = state
            j0 = blocks.start(jk, C, S)
            s, _ = _logits(ops, opt, q_blk, i0, 0, j0, jk * C, C, K, G)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # NaN propagates
            shift = jnp.where(m_new == -jnp.inf, 0, m_new)
            p = jnp.exp(s - shift[..., None])
            alpha = jnp.exp(m - shift)
            v_blk = lax.dynamic_slice_in_dim(v, j0, C, axis=1)
            l_new = l * alpha + jnp.sum(p, axis=-1)  # the normaliser is not dropped
            if opt.dropout_rate > 0:
                p = p * _dropout_factors(ops, opt, i0, j0, p.shape, acc)
            pv = _dot("bkgqs,bskh->bkgqh", p, v_blk, acc)
            return m_new, l_new, o * alpha[..., None] + pv

        # Zeros shaped (and, under sharding in types, sharded) like the rows.
        o0 = jnp.transpose(_zeros_like(q_blk, acc), (0, 2, 3, 1, 4))  # (B, K, G, R, H)
        init = (o0[..., 0] - jnp.inf, o0[..., 0], o0)
        if opt.has_sinks:  # the sink is one more logit, without a value: m = sink, l = 1
            sink = ops.sinks.astype(acc).reshape(-1, K, G, 1)
            init = (o0[..., 0] + sink, o0[..., 0] + 1, o0)
        lo, hi = _key_block_range(opt, i0, R, blocks)
        m, l, o = lax.fori_loop(lo, hi, _skip_invisible_blocks(ops, opt, i0, blocks, key_block),
                                init)
        empty = l == 0  # no allowed key (NaN: a NaN logit, stays NaN)
        safe_l = jnp.where(empty, 1, l)
        o = jnp.where(empty[..., None], 0, o / safe_l[..., None])
        lse_blk = jnp.where(empty, -jnp.inf, m + jnp.log(safe_l))
        o = jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype)  # (B, R, K, G, H)
        out = lax.dynamic_update_slice_in_dim(out, o, i0, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, jnp.transpose(lse_blk, (0, 3, 1, 2)), i0,
                                              axis=1)
        return out, lse

    out, lse = lax.fori_loop(0, blocks.num_row_blocks, row_block,
                             (_zeros_like(qg), _zeros_like(qg[..., 0], acc)))
    return out.reshape(B, T, N, H), lse.reshape(B, T, N)


def _add_at(x, update, starts):
    """x with `update` added to the block of x at `starts` (one per dim)."""
    return lax.dynamic_update_slice(x, lax.dynamic_slice(x, starts, update.shape) + update,
                                    starts)


def backward(ops: Operands, opt: Options, lse, dout, delta):
    """(dq, dk, dv, dbias) from the residuals; delta = rowsum(dO * O) - dlse.
    dbias has the bias operand's (broadcast) shape, zeros without a bias."""
    q, k, v, bias = ops.query, ops.key, ops.value, ops.bias
    B, T, N, H, S, K, G, acc, blocks = _sizes(ops, opt)
    R, C = blocks.rows, blocks.keys
    qg, dog = q.reshape(B, T, K, G, H), dout.reshape(B, T, K, G, H)
    # Per row (B, K, G, T): an empty row's lse (-inf) becomes +inf so P = 0.
    lse_g = jnp.transpose(lse, (0, 2, 1)).reshape(B, K, G, T)
    lse_g = jnp.where(lse_g == -jnp.inf, jnp.inf, lse_g)
    delta_g = jnp.transpose(delta, (0, 2, 1)).reshape(B, K, G, T)
    bias_shape = bias.shape

    def reduce_to_bias(ds):
        """(B, K, G, R, C) logit gradients -> the bias block's shape."""
        ds = ds.reshape(B, N, R, C)
        dims = tuple(d for d in range(4) if bias_shape[d] == 1 and ds.shape[d] != 1)
        return jnp.sum(ds, axis=dims, keepdims=True)

    def row_block(iq, carry):
        dq, dk, dv, dbias = carry
        i0 = blocks.start(iq, R, T)
        q_blk = lax.dynamic_slice_in_dim(qg, i0, R, axis=1)
        do_blk = lax.dynamic_slice_in_dim(dog, i0, R, axis=1)
        lse_blk = lax.dynamic_slice_in_dim(lse_g, i0, R, axis=3)[..., None]
        delta_blk = lax.dynamic_slice_in_dim(delta_g, i0, R, axis=3)[..., None]

        def key_block(jk, state):
            dq_blk, dk, dv, dbias = state
            j0 = blocks.start(jk, C, S)
            # Rows shared with the previous block were counted there.
            s, t = _logits(ops, opt, q_blk, i0, iq * R, j0, jk * C, C, K, G)
            p = jnp.exp(s - lse_blk)
            k_blk = lax.dynamic_slice_in_dim(k, j0, C, axis=1)
            v_blk = lax.dynamic_slice_in_dim(v, j0, C, axis=1)
            dp = _dot("bqkgh,bskh->bkgqs", do_blk, v_blk, acc)
            pz = p
            if opt.dropout_rate > 0:  # dV takes (P Z)^T dO, dS = P (dP Z - delta)
                z = _dropout_factors(ops, opt, i0, j0, p.shape, acc)
                pz, dp = p * z, dp * z
            dv = _add_at(dv, _dot("bkgqs,bqkgh->bskh", pz, do_blk, acc), (0, j0, 0, 0))
            ds = p * (dp - delta_blk)  # gradient of the final logits
            if opt.has_bias:
                starts = (0, 0, i0 if bias_shape[2] != 1 else 0, j0 if bias_shape[3] != 1 else 0)
                dbias = _add_at(dbias, reduce_to_bias(ds), starts)
            if opt.softcap > 0:
                ds = ds * (1 - t * t)
            ds = ds * jnp.asarray(opt.scale, acc)
            dq_blk = dq_blk + _dot("bkgqs,bskh->bqkgh", ds, k_blk, acc)
            dk = _add_at(dk, _dot("bkgqs,bqkgh->bskh", ds, q_blk, acc), (0, j0, 0, 0))
            return dq_blk, dk, dv, dbias

        lo, hi = _key_block_range(opt, i0, R, blocks)
        dq_blk, dk, dv, dbias = lax.fori_loop(
            lo, hi, _skip_invisible_blocks(ops, opt, i0, blocks, key_block),
            (_zeros_like(q_blk, acc), dk, dv, dbias))
        dq = _add_at(dq, dq_blk, (0, i0, 0, 0, 0))
        return dq, dk, dv, dbias

    # Zeros shaped and sharded like what they accumulate gradients for.
    init = (_zeros_like(qg, acc), _zeros_like(k, acc), _zeros_like(v, acc),
            _zeros_like(bias, acc))
    dq, dk, dv, dbias = lax.fori_loop(0, blocks.num_row_blocks, row_block, init)
    return (dq.reshape(B, T, N, H).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            dbias)


# Compiled once per shape and options (eager calls would otherwise retrace and
# recompile the loops every time). Block sizes are read when tracing.
@functools.partial(jax.jit, static_argnums=(0,))
def _forward_compiled(options: Options, *args):
    return forward(Operands(*args), options)


@functools.partial(jax.jit, static_argnums=(0,))
def _backward_compiled(options: Options, *args):
    lse, dout, delta = args[NUM_OPERANDS:]
    return backward(Operands(*args[:NUM_OPERANDS]), options, lse, dout, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(options: Options, *args):
    return _forward_compiled(options, *args)


def _attention_fwd(options, *args):
    out, lse = _forward_compiled(options, *args)
    return (out, lse), (args, out, lse)


def _attention_bwd(options, residuals, cotangents):
    args, out, lse = residuals
    ops = Operands(*args)
    dout, dlse = _sharded_like(cotangents[0], out), _sharded_like(cotangents[1], lse)
    acc = accumulation_dtype(out.dtype)
    delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
    dq, dk, dv, dbias = _backward_compiled(options, *args, lse, dout.astype(out.dtype), delta)
    dsinks = (_xla.sinks_gradient(ops.sinks, lse, delta) if options.has_sinks
              else jnp.zeros_like(ops.sinks))
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    return (dq, dk, dv, dbias, zero(ops.mask), zero(ops.q_lengths), zero(ops.kv_lengths),
            zero(ops.q_segments), zero(ops.kv_segments), dsinks.astype(ops.sinks.dtype),
            zero(ops.dropout_seed))


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(ops: Operands, opt: Options) -> tuple[jax.Array, jax.Array]:
    """(out, lse), differentiable (custom VJP with a blockwise backward)."""
    return _attention(opt, *ops.as_tuple())

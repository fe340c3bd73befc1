"""Ring attention: attention over a sequence sharded along a ring of devices
(context parallelism), built on the kernels' (out, lse).

Each device keeps its block of queries; the key/value blocks travel around the
ring (``ppermute``), one step per device. Every step runs the ordinary kernels
on (local queries, visiting keys) and merges the partial result into the
running one through the logsumexp. The backward pass is a ring too: the
key/value blocks travel with their gradient accumulators, each device adds its
queries' contribution and the accumulators arrive home after a full turn. The
per-block backward is exact because it is given the final lse and
``delta = rowsum(dO * O) - dlse`` of the whole row.

The code here runs per device: inside ``shard_map`` (:func:`ring_attention`)
and inside the custom partitioning of the primitives (jax_mfa/_sharding.py).

Layouts. Blocks are contiguous: device d holds rows [d*L, (d+1)*L). For causal
attention with T == S this would leave device 0 nearly idle and device n-1
doing n times its work, so the rows are first exchanged into the *zigzag*
layout: the sequence is cut into 2n chunks of ceil(L/2) rows (the second chunk
of a block padded by one row when L is odd) and device d holds chunks d and
2n-1-d. Then every step after the first costs every device half a block, and
the first (the diagonal) is causal on the local rows. Chunks are whole
(visible, diagonal or invisible) against each other, so causal needs no mask.

Absolute positions: the kernels see block-local rows, so positions enter only
through the lengths (clipped to each key chunk, where valid keys are always a
prefix) and, for sliding windows or causal attention with T != S, through a
boolean mask built per block from the absolute positions (T/n x S/n bytes).
Padded query rows are zero and their results are dropped; with a zero output
gradient they add nothing to the key/value gradients. Segment ids are
position-free: a key/value block's ids travel with it. Sinks are one more key
without value: they join once, in the final merge (add_sinks).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_mfa import _xla
from jax_mfa._arguments import Operands, Options, accumulation_dtype


@dataclasses.dataclass(frozen=True)
class Ring:
    """Static description of a ring (hashable: it is a custom_vjp parameter)."""

    axis: tuple[str, ...]  # mesh axes; the ring runs over their product
    size: int  # number of devices on the ring
    q_rows: int  # local query rows (T / size)
    kv_rows: int  # local key/value rows (S / size)
    zigzag: bool  # causal, T == S: balanced zigzag layout (see the module doc)

    @property
    def chunk(self) -> int:
        return (self.q_rows + 1) // 2

    @classmethod
    def make(cls, axis, size: int, q_rows: int, kv_rows: int, options: Options) -> "Ring":
        axis = (axis,) if isinstance(axis, str) else tuple(axis)
        zigzag = (options.is_causal and options.window_left < 0 and options.window_right < 0
                  and q_rows == kv_rows and size > 1)
        return cls(axis, size, q_rows, kv_rows, zigzag)


class Kernels(NamedTuple):
    """The per-block kernels: fwd(options, q, k, v, bias, mask, q_lengths,
    kv_lengths) -> (out, lse) and bwd(options, ..., lse, dout, delta) ->
    (dq, dk, dv, dbias)."""

    fwd: Callable
    bwd: Callable


class Block(NamedTuple):
    """One kernel call of a ring step: local query rows against rows of the
    visiting key/value block. Static: the slices and `causal`; dynamic: the
    rest."""

    q_rows: slice
    kv_rows: slice
    causal: bool
    column: jax.Array  # first column of these keys in the bias/mask layout
    q_len: jax.Array | None  # (B,) valid query rows, when query lengths are given
    kv_len: jax.Array  # (B,) valid key rows (lengths and padding)
    allowed: jax.Array | None  # (1, 1, rows, keys) bool from absolute positions


# ----------------------------------------------------------------------------
# Moving blocks around the ring


def _index(ring: Ring):
    return jax.lax.axis_index(ring.axis)


def _shift(ring: Ring, tree):
    """Sends every device's blocks to the next device on the ring."""
    perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis, perm), tree)


def _zigzag_home(ring: Ring, chunk: int) -> int:
    """The device that holds `chunk` in the zigzag layout."""
    return chunk if chunk < ring.size else 2 * ring.size - 1 - chunk


def _pad_dim(x, dim: int, rows: int, value=0):
    if rows == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[dim] = (0, rows)
    return jnp.pad(x, pad, constant_values=value)


def _to_zigzag(ring: Ring, x, dim: int):
    """Contiguous block (chunks 2d, 2d+1) -> zigzag block (chunks d, 2n-1-d)."""
    c, n = ring.chunk, ring.size
    x = _pad_dim(x, dim, 2 * c - x.shape[dim])
    halves = jnp.split(x, 2, axis=dim)
    got = [jax.lax.ppermute(h, ring.axis, [(d, _zigzag_home(ring, 2 * d + half))
                                           for d in range(n)])
           for half, h in enumerate(halves)]
    even = _index(ring) % 2 == 0  # chunk d is even, chunk 2n-1-d odd
    return jnp.concatenate([jnp.where(even, got[0], got[1]), jnp.where(even, got[1], got[0])],
                           axis=dim)


def _from_zigzag(ring: Ring, x, dim: int, rows: int):
    """Inverse of _to_zigzag, trimmed to the original `rows`."""
    n = ring.size
    first, second = jnp.split(x, 2, axis=dim)
    even = _index(ring) % 2 == 0
    by_parity = (jnp.where(even, first, second), jnp.where(even, second, first))
    halves = [jax.lax.ppermute(h, ring.axis, [(_zigzag_home(ring, 2 * d + half), d)
                                              for d in range(n)])
              for half, h in enumerate(by_parity)]
    return jax.lax.slice_in_dim(jnp.concatenate(halves, axis=dim), 0, rows, axis=dim)


def _columns_to_layout(ring: Ring, x):
    """The key (last) dim of a bias/mask, whole on every device, in the layout
    of the key chunks: with zigzag each block of kv_rows is padded to 2 chunks,
    so chunk k starts at column k * chunk."""
    if not ring.zigzag or x.shape[3] == 1:
        return x
    x = x.reshape(x.shape[:3] + (ring.size, ring.kv_rows))
    x = _pad_dim(x, 4, 2 * ring.chunk - ring.kv_rows)
    return x.reshape(x.shape[:3] + (-1,))


def _columns_from_layout(ring: Ring, x):
    if not ring.zigzag or x.shape[3] == 1:
        return x
    x = x.reshape(x.shape[:3] + (ring.size, 2 * ring.chunk))[..., :ring.kv_rows]
    return x.reshape(x.shape[:3] + (-1,))


# ----------------------------------------------------------------------------
# Which kernel calls a step makes


def _clip(limit, start, size):
    return jnp.clip(limit - start, 0, size).astype(jnp.int32)


class _Limits(NamedTuple):
    q: jax.Array | None  # (B,) query lengths (absolute), if given
    kv: jax.Array  # (B,) key/value lengths (absolute; S if not given)


def _zigzag_chunk_len(ring: Ring, limit, chunk):
    """Rows of zigzag `chunk` below the absolute length `limit` (padding excluded)."""
    valid = jnp.where(chunk % 2 == 0, ring.chunk, ring.q_rows - ring.chunk)
    start = (chunk // 2) * ring.q_rows + (chunk % 2) * ring.chunk
    return _clip(limit, start, valid)


def _zigzag_blocks(ring: Ring, limits: _Limits, d, j, kind: str) -> list[Block]:
    """Calls for query chunks (d, 2n-1-d) against key chunks (j, 2n-1-j).
    kind: "diagonal" (j == d), "early" (j < d: all queries see chunk j, none
    sees 2n-1-j) or "late" (j > d: only chunk 2n-1-d sees, both key chunks)."""
    n, c = ring.size, ring.chunk
    last = lambda x: 2 * n - 1 - x  # noqa: E731  the second chunk of device x
    first_half, second_half, both = slice(0, c), slice(c, 2 * c), slice(0, 2 * c)

    def q_len(rows):
        if limits.q is None:
            return None
        tail = _zigzag_chunk_len(ring, limits.q, last(d))
        if rows == second_half:
            return tail
        # Both chunks: the valid rows are a prefix (padding in between is
        # harmless, see the module doc).
        return jnp.where(tail > 0, c + tail, _zigzag_chunk_len(ring, limits.q, d))

    def block(rows, kv_rows, causal, kv_chunk):
        return Block(rows, kv_rows, causal, kv_chunk * c, q_len(rows),
                     _zigzag_chunk_len(ring, limits.kv, kv_chunk), None)

    if kind == "diagonal":
        return [block(both, first_half, True, j), block(second_half, second_half, True, last(j))]
    if kind == "early":
        return [block(both, first_half, False, j)]
    return [block(second_half, first_half, False, j),
            block(second_half, second_half, False, last(j))]


def _contiguous_block(ring: Ring, options: Options, limits: _Limits, d, j) -> Block:
    T, S = ring.q_rows, ring.kv_rows
    q_len = None if limits.q is None else _clip(limits.q, d * T, T)
    allowed = None
    if options.is_causal or options.window_left >= 0 or options.window_right >= 0:
        structural = dataclasses.replace(options, has_mask=False, has_q_lengths=False,
                                         has_kv_lengths=False)
        allowed = _xla.allowed_keys(None, structural, (1, T, 1, S), q_start=d * T,
                                    k_start=j * S)
    return Block(slice(0, T), slice(0, S), False, j * S, q_len, _clip(limits.kv, j * S, S),
                 allowed)


def _block_options(options: Options, block: Block) -> Options:
    return dataclasses.replace(options, is_causal=block.causal, window_left=-1,
                               window_right=-1, has_kv_lengths=True, has_sinks=False,
                               has_mask=options.has_mask or block.allowed is not None)


def _block_slice(x, block: Block, width: int):
    """The bias/mask entries of a block: rows of the query block, `width`
    columns from block.column (broadcast dims stay)."""
    if x.shape[2] > 1:
        x = x[:, :, block.q_rows]
    if x.shape[3] > 1:
        x = jax.lax.dynamic_slice_in_dim(x, block.column, width, axis=3)
    return x


def _block_operands(ops: Operands, visiting: "_Visiting", block: Block, options: Options):
    q = ops.query[:, block.q_rows]
    k, v = visiting.key[:, block.kv_rows], visiting.value[:, block.kv_rows]
    q_segments, kv_segments = ops.q_segments, visiting.kv_segments
    if options.has_segment_ids:  # ids are position-free: the block's own ids
        q_segments, kv_segments = q_segments[:, block.q_rows], kv_segments[:, block.kv_rows]
    width = k.shape[1]
    bias = _block_slice(ops.bias, block, width) if options.has_bias else ops.bias
    mask = _block_slice(ops.mask, block, width) if options.has_mask else ops.mask
    if block.allowed is not None:
        mask = block.allowed & mask if options.has_mask else block.allowed
    q_len = ops.q_lengths if block.q_len is None else block.q_len
    # Sinks enter once, in the final merge (see forward); dropout is never on
    # here (see unsupported_features): placeholders.
    return Operands(q, k, v, bias, mask, q_len, block.kv_len, q_segments,
                    kv_segments).as_tuple()


# ----------------------------------------------------------------------------
# Forward and backward rings


class _Visiting(NamedTuple):
    """What travels around the ring: a key/value block with its segment ids
    (a placeholder without them) and, in the backward, its gradients."""

    key: jax.Array
    value: jax.Array
    kv_segments: jax.Array
    dkey: jax.Array | None = None
    dvalue: jax.Array | None = None


class _Local(NamedTuple):
    ops: Operands  # in the ring layout; bias/mask key columns in the chunk layout
    limits: _Limits
    index: jax.Array  # this device's place on the ring


def _prepare(ring: Ring, ops: Operands, options: Options, *row_arrays):
    """Operands (and extra arrays with query rows in dim 1: lse, dout, delta)
    in the ring layout."""
    B = ops.query.shape[0]
    limits = _Limits(ops.q_lengths if options.has_q_lengths else None,
                     ops.kv_lengths if options.has_kv_lengths else
                     jnp.full((B,), ring.size * ring.kv_rows, jnp.int32))
    bias, mask = (_columns_to_layout(ring, x) for x in (ops.bias, ops.mask))
    q, k, v = ops.query, ops.key, ops.value
    q_segments, kv_segments = ops.q_segments, ops.kv_segments
    if ring.zigzag:
        q, k, v = (_to_zigzag(ring, x, 1) for x in (q, k, v))
        if options.has_segment_ids:
            q_segments, kv_segments = (_to_zigzag(ring, x, 1) for x in (q_segments, kv_segments))
        bias, mask = (_to_zigzag(ring, x, 2) if x.shape[2] > 1 else x for x in (bias, mask))
        row_arrays = tuple(_to_zigzag(ring, x, 1) for x in row_arrays)
    local = _Local(Operands(q, k, v, bias, mask, ops.q_lengths, ops.kv_lengths, q_segments,
                            kv_segments), limits, _index(ring))
    return local, row_arrays


def _from_layout(ring: Ring, x, dim: int = 1):
    return _from_zigzag(ring, x, dim, ring.q_rows) if ring.zigzag else x


def _run_step(ring: Ring, options: Options, local: _Local, step: int, visiting, state, run):
    """Runs `run(blocks, visiting, state)` for ring step `step`, choosing the
    blocks by the (dynamic) owner of the visiting key/value block."""
    d = local.index
    j = (d - step) % ring.size
    if not ring.zigzag:
        return run([_contiguous_block(ring, options, local.limits, d, j)], visiting, state)
    if isinstance(step, int) and step == 0:  # the own block (traced apart, see _around)
        return run(_zigzag_blocks(ring, local.limits, d, j, "diagonal"), visiting, state)
    early = lambda vs, st: run(_zigzag_blocks(ring, local.limits, d, j, "early"), vs, st)  # noqa
    late = lambda vs, st: run(_zigzag_blocks(ring, local.limits, d, j, "late"), vs, st)  # noqa
    return jax.lax.cond(j < d, early, late, visiting, state)


def _around(ring: Ring, step, visiting, state):
    """One turn of the ring: step(s, visiting, state) -> (visiting, state) for
    s = 0..n-1, the visiting blocks moving on between steps. Step 0 (the own
    block) is traced apart; the others run in a loop, so that the buffers of
    one step are reused by the next."""
    visiting, state = step(0, visiting, state)

    def body(s, carry):
        return step(s, _shift(ring, carry[0]), carry[1])

    if ring.size > 1:
        visiting, state = jax.lax.fori_loop(1, ring.size, body, (visiting, state))
    return visiting, state


def _update_rows(x, rows: slice, update, add: bool = False):
    """x[:, rows] = update (+= with add). Rows covering all of dim 1 are a
    plain replacement: XLA's CPU compiler of jax 0.11.2 crashes on an update
    covering its whole operand inside shard_map (a segfault in
    backend_compile_and_load; benchmarks/probe_ring_compile.py, mini_at_set_full)."""
    if rows.indices(x.shape[1]) == (0, x.shape[1], 1):
        return x + update if add else update.astype(x.dtype)
    return x.at[:, rows].add(update) if add else x.at[:, rows].set(update)


def merge(out, lse, part_out, part_lse):
    """Combines two partial softmax results over disjoint key sets."""
    new = jnp.logaddexp(lse, part_lse)
    safe = jnp.where(jnp.isfinite(new), new, 0)
    weight = lambda l: jnp.exp(l - safe)[..., None]  # noqa: E741,E731  0 where l = -inf
    return out * weight(lse) + part_out.astype(out.dtype) * weight(part_lse), new


def unsupported_features(options: Options) -> list[str]:
    """The options ring attention does not implement: dropout (its Philox
    counters are the global head, row and key indices; the kernels only know
    block-local ones)."""
    return ["dropout"] if options.dropout_rate > 0 else []


def add_sinks(out, lse, sinks):
    """(out, lse) with the sinks (1|B, N) as one more key that carries no value:
    the merge with an empty partial result whose lse is the sink logit."""
    sink_lse = jnp.broadcast_to(sinks[:, None, :], lse.shape).astype(lse.dtype)
    return merge(out, lse, jnp.zeros((), out.dtype), sink_lse)


def forward(kernels: Kernels, ring: Ring, options: Options, ops: Operands, vary=lambda x: x):
    """(out, lse) of the whole sequence for this device's query rows.
    `vary` marks arrays made here as varying over the manual axes (shard_map)."""
    if unsupported_features(options):
        raise ValueError(f"ring attention does not support {', '.join(unsupported_features(options))}")
    local, _ = _prepare(ring, ops, options)
    q = local.ops.query
    acc = accumulation_dtype(q.dtype)
    out = vary(jnp.zeros(q.shape, acc))
    lse = vary(jnp.full(q.shape[:3], -jnp.inf, acc))

    def run(blocks, visiting, state):
        out, lse = state
        for block in blocks:
            part = kernels.fwd(_block_options(options, block),
                               *_block_operands(local.ops, visiting, block, options))
            rows = block.q_rows
            o, l = merge(out[:, rows], lse[:, rows], *part)
            out, lse = _update_rows(out, rows, o), _update_rows(lse, rows, l)
        return out, lse

    def step(s, visiting, state):
        return visiting, _run_step(ring, options, local, s, visiting, state, run)

    visiting = _Visiting(local.ops.key, local.ops.value, local.ops.kv_segments)
    _, (out, lse) = _around(ring, step, visiting, (out, lse))
    if options.has_sinks:
        out, lse = add_sinks(out, lse, ops.sinks)
    return _from_layout(ring, out.astype(q.dtype)), _from_layout(ring, lse)


def _add_block(acc, part, block: Block):
    """acc[block's rows, block's columns] += part (bias gradient)."""
    start = [0, 0, block.q_rows.start if acc.shape[2] > 1 else 0,
             block.column if acc.shape[3] > 1 else 0]
    start = [jnp.asarray(s, jnp.int32) for s in start]
    current = jax.lax.dynamic_slice(acc, start, part.shape)
    return jax.lax.dynamic_update_slice(acc, current + part.astype(acc.dtype), start)


def backward(kernels: Kernels, ring: Ring, options: Options, ops: Operands, lse, dout, delta,
             vary=lambda x: x):
    """(dq, dk, dv, dbias) for this device's blocks. lse and delta are those of
    the whole rows (delta = rowsum(dout * out) - dlse), sinks included: then
    every block's backward is exact without them (d sinks is
    _xla.sinks_gradient of the same lse and delta). dbias holds this device's
    contribution (reduce it over devices the bias is shared by)."""
    local, (lse, dout, delta) = _prepare(ring, ops, options, lse, dout, delta)
    q, k, v = local.ops.query, local.ops.key, local.ops.value
    acc = accumulation_dtype(q.dtype)
    zeros = lambda x: vary(jnp.zeros(x.shape, acc))  # noqa: E731
    dq, dbias = zeros(q), zeros(local.ops.bias)

    def run(blocks, visiting, state):
        dk, dv = visiting.dkey, visiting.dvalue
        dq, dbias = state
        for block in blocks:
            rows, kv_rows = block.q_rows, block.kv_rows
            parts = kernels.bwd(_block_options(options, block),
                                *_block_operands(local.ops, visiting, block, options),
                                lse[:, rows], dout[:, rows], delta[:, rows])
            dq = _update_rows(dq, rows, parts[0].astype(acc), add=True)
            dk = _update_rows(dk, kv_rows, parts[1].astype(acc), add=True)
            dv = _update_rows(dv, kv_rows, parts[2].astype(acc), add=True)
            if options.has_bias:
                dbias = _add_block(dbias, parts[3], block)
        return visiting._replace(dkey=dk, dvalue=dv), (dq, dbias)

    def step(s, visiting, state):
        return _run_step(ring, options, local, s, visiting, state, run)

    visiting = _Visiting(k, v, local.ops.kv_segments, zeros(k), zeros(v))
    visiting, state = _around(ring, step, visiting, (dq, dbias))
    # The gradient accumulators made n-1 moves with their blocks: one more
    # brings them home.
    dk, dv = visiting.dkey, visiting.dvalue
    if ring.size > 1:
        dk, dv = _shift(ring, (dk, dv))
    dq, dbias = state
    dbias = _columns_from_layout(ring, dbias)
    if ring.zigzag and dbias.shape[2] > 1:
        dbias = _from_zigzag(ring, dbias, 2, ring.q_rows)
    dtype = q.dtype
    return (_from_layout(ring, dq).astype(dtype), _from_layout(ring, dk).astype(dtype),
            _from_layout(ring, dv).astype(dtype), dbias.astype(ops.bias.dtype))

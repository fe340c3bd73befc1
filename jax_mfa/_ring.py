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
doing n times its work, so the rows are first exchanged into a *balanced*
(zigzag-like) layout: the sequence is cut into 2n chunks of ceil(L/2) rows
(the second chunk of a block padded by one row when L is odd); device d keeps
its first chunk 2d in place and swaps its second chunk with device n-1-d, so
it holds chunks 2d and 2n-1-2d. Any pair of chunks a and 2n-1-a balances the
work, and this pairing moves only half a block each way (the exchange is its
own inverse). Then every step after the first costs every device half a block
(two of the four chunk pairs), and the first (the diagonal) is causal on each
chunk. Chunks are whole (visible, diagonal or invisible) against each other,
so causal needs no mask. The two chunks stay separate arrays all along (the
*parts* of the local block; the contiguous layout has one part, the whole
block): every visible chunk pair is its own kernel call on whole arrays, and
every accumulator is per part, so that nothing is concatenated, sliced for a
kernel or partly updated; the branches over the visiting block's owner return
only the kernels' results, folded into the accumulators outside them, and in
the backward each kernel call waits for the previous call's fold. Each
of these saved XLA copies of local blocks (benchmarks/RESULTS.md, "Ring
attention", has the memory per device and what remains).

Absolute positions: the kernels see block-local rows, so positions enter only
through the lengths (clipped to each key chunk, where valid keys are always a
prefix) and, for sliding windows or causal attention with T != S, through a
boolean mask built per block from the absolute positions (T/n x S/n bytes).
Padded query rows are zero and their results are dropped; with a zero output
gradient they add nothing to the key/value gradients. Segment ids are
position-free: a key/value block's ids travel with it. Sinks are one more key
without value: they join once, in the final merge (add_sinks). Dropout draws
from absolute indices: each kernel call's seed carries the absolute position
of its first query and key row (Block.q_start, Block.kv_start); every call
covers one chunk of contiguous absolute rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jax_mfa import _philox, _xla
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
    """One kernel call of a ring step: a local query part against a part of
    the visiting key/value block. Static: the parts, `q_rows` and `causal`;
    dynamic: the rest."""

    q_part: int | jax.Array  # index into the local query parts
    kv_part: int | jax.Array  # index into the visiting key/value parts
    q_rows: slice | None  # the query part's rows in the local rows (for bias/mask)
    causal: bool
    column: jax.Array  # first column of these keys in the bias/mask layout
    q_len: jax.Array | None  # (B,) valid query rows, when query lengths are given
    kv_len: jax.Array  # (B,) valid key rows (lengths and padding)
    allowed: jax.Array | None  # (1, 1, rows, keys) bool from absolute positions
    q_start: jax.Array  # absolute position of the first query row (dropout's origin)
    kv_start: jax.Array  # and of the first key row


# ----------------------------------------------------------------------------
# Moving blocks around the ring


def _index(ring: Ring):
    return jax.lax.axis_index(ring.axis)


def _shift(ring: Ring, tree):
    """Sends every device's blocks to the next device on the ring."""
    perm = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis, perm), tree)


def _pad_dim(x, dim: int, rows: int, value=0):
    if rows == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[dim] = (0, rows)
    return jnp.pad(x, pad, constant_values=value)


def _parts(ring: Ring, x, dim: int) -> list:
    """A block of rows (in `dim`) in the ring layout, as a list of parts: the
    block itself, or (balanced layout) its first chunk and the second chunk
    of device n-1-d (its own second chunk goes there; padded to a whole
    chunk when the block has an odd number of rows)."""
    if not ring.zigzag:
        return [x]
    c, n, rows = ring.chunk, ring.size, x.shape[dim]
    first = jax.lax.slice_in_dim(x, 0, c, axis=dim)
    second = _pad_dim(jax.lax.slice_in_dim(x, c, rows, axis=dim), dim, 2 * c - rows)
    return [first, jax.lax.ppermute(second, ring.axis, [(i, n - 1 - i) for i in range(n)])]


def _join(ring: Ring, parts: list, dim: int, rows: int, offset: int = 0):
    """Inverse of _parts: the contiguous block, trimmed to `rows`. With
    `offset` (0 or 1), device i holds the parts of device i + offset's block,
    and both chunks go home in one move (the backward's key/value gradients)."""
    if not ring.zigzag:
        return _shift(ring, parts[0]) if offset else parts[0]
    n = ring.size
    owner = lambda i: (i + offset) % n  # noqa: E731
    first, second = parts
    if offset:
        first = jax.lax.ppermute(first, ring.axis, [(i, owner(i)) for i in range(n)])
    second = jax.lax.ppermute(second, ring.axis, [(i, n - 1 - owner(i)) for i in range(n)])
    return jax.lax.slice_in_dim(jnp.concatenate([first, second], axis=dim), 0, rows, axis=dim)


def _to_balanced(ring: Ring, x, dim: int):
    """The balanced layout as one array (bias and mask rows: sliced per kernel call)."""
    return jnp.concatenate(_parts(ring, x, dim), axis=dim)


def _from_balanced(ring: Ring, x, dim: int, rows: int):
    c = ring.chunk
    halves = [jax.lax.slice_in_dim(x, h * c, (h + 1) * c, axis=dim) for h in (0, 1)]
    return _join(ring, halves, dim, rows)


def _swap_column_chunks(ring: Ring, x):
    """(..., n, 2, chunk) columns: the second chunks in reverse device order
    (the balanced layout's pairing, its own inverse)."""
    return jnp.concatenate([x[..., :1, :], x[..., ::-1, 1:, :]], axis=-2)


def _columns_to_layout(ring: Ring, x):
    """The key (last) dim of a bias/mask, whole on every device, in the
    balanced layout of the key blocks: each block of kv_rows padded to 2
    chunks, so the local half h of device j starts at column (2j + h) * chunk."""
    if not ring.zigzag or x.shape[3] == 1:
        return x
    x = x.reshape(x.shape[:3] + (ring.size, ring.kv_rows))
    x = _pad_dim(x, 4, 2 * ring.chunk - ring.kv_rows)
    x = _swap_column_chunks(ring, x.reshape(x.shape[:4] + (2, ring.chunk)))
    return x.reshape(x.shape[:3] + (-1,))


def _columns_from_layout(ring: Ring, x):
    if not ring.zigzag or x.shape[3] == 1:
        return x
    x = _swap_column_chunks(ring, x.reshape(x.shape[:3] + (ring.size, 2, ring.chunk)))
    x = x.reshape(x.shape[:3] + (ring.size, 2 * ring.chunk))[..., :ring.kv_rows]
    return x.reshape(x.shape[:3] + (-1,))


# ----------------------------------------------------------------------------
# Which kernel calls a step makes


def _clip(limit, start, size):
    return jnp.clip(limit - start, 0, size).astype(jnp.int32)


class _Limits(NamedTuple):
    q: jax.Array | None  # (B,) query lengths (absolute), if given
    kv: jax.Array  # (B,) key/value lengths (absolute; S if not given)


def _chunk_start(ring: Ring, chunk):
    """Absolute position of the first row of (absolute) `chunk`."""
    return (chunk // 2) * ring.q_rows + (chunk % 2) * ring.chunk


def _chunk_len(ring: Ring, limit, chunk):
    """Rows of (absolute) `chunk` below the absolute length `limit` (padding excluded)."""
    valid = jnp.where(chunk % 2 == 0, ring.chunk, ring.q_rows - ring.chunk)
    return _clip(limit, _chunk_start(ring, chunk), valid)


def _chunk_of(ring: Ring, device, half: int):
    """The absolute chunk that local half `half` of `device` holds (balanced layout)."""
    return 2 * device if half == 0 else 2 * ring.size - 1 - 2 * device


# The visible chunk pairs (query half, key half, causal) of device d's chunks
# (2d, 2n-1-2d) against device j's (2j, 2n-1-2j): chunk b is visible from a
# when b < a. On the diagonal (j == d) the order of d's chunks decides which
# one sees the other; elsewhere it is whether j < d and whether j + d < n.
_PAIRS = {
    "diagonal, ascending": [(0, 0, True), (1, 0, False), (1, 1, True)],
    "diagonal, descending": [(0, 0, True), (0, 1, False), (1, 1, True)],
    "before, j + d < n": [(0, 0, False), (1, 0, False)],
    "before, j + d >= n": [(0, 0, False), (0, 1, False)],
    "after, j + d < n": [(1, 0, False), (1, 1, False)],
    "after, j + d >= n": [(0, 1, False), (1, 1, False)],
}
_NOT_DIAGONAL = ["before, j + d < n", "before, j + d >= n", "after, j + d < n",
                 "after, j + d >= n"]


def _balanced_blocks(ring: Ring, options: Options, limits: _Limits, d, j, case: str):
    c = ring.chunk

    def length(limit, device, half):
        return _chunk_len(ring, limit, _chunk_of(ring, device, half))

    def start(device, half):
        return _chunk_start(ring, _chunk_of(ring, device, half))

    def block(q_half, kv_half, causal):
        q_len = None if limits.q is None else length(limits.q, d, q_half)
        return Block(q_half, kv_half, slice(q_half * c, (q_half + 1) * c), causal,
                     (2 * j + kv_half) * c, q_len, length(limits.kv, j, kv_half), None,
                     start(d, q_half), start(j, kv_half))

    return [block(*pair) for pair in _PAIRS[case]]


def _contiguous_block(ring: Ring, options: Options, limits: _Limits, d, j) -> Block:
    T, S = ring.q_rows, ring.kv_rows
    q_len = None if limits.q is None else _clip(limits.q, d * T, T)
    allowed = None
    if options.is_causal or options.window_left >= 0 or options.window_right >= 0:
        structural = dataclasses.replace(options, has_mask=False, has_q_lengths=False,
                                         has_kv_lengths=False)
        allowed = _xla.allowed_keys(None, structural, (1, T, 1, S), q_start=d * T,
                                    k_start=j * S)
    return Block(0, 0, slice(0, T), False, j * S, q_len, _clip(limits.kv, j * S, S), allowed,
                 d * T, j * S)


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
    q = ops.query[block.q_part]
    k, v = visiting.key[block.kv_part], visiting.value[block.kv_part]
    q_segments, kv_segments = ops.q_segments, visiting.kv_segments
    if options.has_segment_ids:  # ids are position-free: the block's own ids
        q_segments, kv_segments = q_segments[block.q_part], kv_segments[block.kv_part]
    width = k.shape[1]
    bias = _block_slice(ops.bias, block, width) if options.has_bias else ops.bias
    mask = _block_slice(ops.mask, block, width) if options.has_mask else ops.mask
    if block.allowed is not None:
        mask = block.allowed & mask if options.has_mask else block.allowed
    q_len = ops.q_lengths if block.q_len is None else block.q_len
    seed = ops.dropout_seed
    if options.dropout_rate > 0:  # the counter origin of this block's rows
        seed = _philox.shift_origin(seed, query=block.q_start, key=block.kv_start)
    # Sinks enter once, in the final merge (see forward): a placeholder.
    return Operands(q, k, v, bias, mask, q_len, block.kv_len, q_segments,
                    kv_segments, dropout_seed=seed).as_tuple()


# ----------------------------------------------------------------------------
# Forward and backward rings


class _Visiting(NamedTuple):
    """What travels around the ring: the parts of a key/value block with
    their segment ids (a placeholder without them) and, in the backward,
    their gradients."""

    key: list
    value: list
    kv_segments: list | jax.Array
    dkey: list | None = None
    dvalue: list | None = None


class _Local(NamedTuple):
    # q, k, v (and segment ids) as lists of parts; bias/mask whole, rows in
    # the balanced layout, key columns in the chunk layout.
    ops: Operands
    limits: _Limits
    index: jax.Array  # this device's place on the ring


def _prepare(ring: Ring, ops: Operands, options: Options, *row_arrays):
    """Operands (and extra arrays with query rows in dim 1: lse, dout, delta,
    returned as lists of parts) in the ring layout."""
    B = ops.query.shape[0]
    limits = _Limits(ops.q_lengths if options.has_q_lengths else None,
                     ops.kv_lengths if options.has_kv_lengths else
                     jnp.full((B,), ring.size * ring.kv_rows, jnp.int32))
    bias, mask = (_columns_to_layout(ring, x) for x in (ops.bias, ops.mask))
    q, k, v = (_parts(ring, x, 1) for x in (ops.query, ops.key, ops.value))
    q_segments, kv_segments = ops.q_segments, ops.kv_segments
    if options.has_segment_ids:
        q_segments, kv_segments = (_parts(ring, x, 1) for x in (q_segments, kv_segments))
    if ring.zigzag:
        bias, mask = (_to_balanced(ring, x, 2) if x.shape[2] > 1 else x for x in (bias, mask))
    row_arrays = tuple(_parts(ring, x, 1) for x in row_arrays)
    local = _Local(Operands(q, k, v, bias, mask, ops.q_lengths, ops.kv_lengths, q_segments,
                            kv_segments, ops.sinks, ops.dropout_seed), limits, _index(ring))
    return local, row_arrays


def _step_blocks(ring: Ring, options: Options, local: _Local, step: int):
    """The kernel calls of ring step `step` as (cases, index): the calls of
    each case the (dynamic) owner of the visiting block may fall in (all
    cases make the same number of calls), and which case it is."""
    d = local.index
    j = (d - step) % ring.size
    if not ring.zigzag:
        return [[_contiguous_block(ring, options, local.limits, d, j)]], 0
    if isinstance(step, int) and step == 0:  # the own block (traced apart, see _around)
        names = ["diagonal, descending", "diagonal, ascending"]
        index = (2 * d < ring.size).astype(jnp.int32)
    else:
        names = _NOT_DIAGONAL
        index = 2 * (j > d).astype(jnp.int32) + (j + d >= ring.size).astype(jnp.int32)
    return [_balanced_blocks(ring, options, local.limits, d, j, name) for name in names], index


def _chosen(blocks: list, index) -> Block:
    """The block of the case `index` (dynamic) picks among `blocks`, one per
    case: what the accumulation needs (parts, columns) without the slices."""
    if len(blocks) == 1:
        return blocks[0]
    pick = lambda values: jnp.stack([jnp.asarray(v) for v in values])[index]  # noqa: E731
    fields = {name: pick([getattr(b, name) for b in blocks])
              for name in ("q_part", "kv_part", "column", "kv_len", "q_start", "kv_start")}
    q_len = None if blocks[0].q_len is None else pick([b.q_len for b in blocks])
    return Block(q_rows=None, causal=False, q_len=q_len, allowed=None, **fields)


def _run_step(ring: Ring, options: Options, local: _Local, step: int, visiting, call, fold):
    """Ring step `step`: for each kernel call, `call(block, visiting)` in a
    branch per case of the (dynamic) owner of the visiting block, then
    `fold(block, results)` (the block's parts may be dynamic), which returns
    the accumulators it updated, or None. The branches return the kernels'
    results only, so that XLA need not copy the accumulators through them.
    A call waits for the accumulators the previous fold returned (_ready):
    otherwise XLA fuses the folds of a step into one, which keeps every
    call's results alive at once."""
    cases, index = _step_blocks(ring, options, local, step)
    ready = None

    def branch(block):
        return lambda vs, ready: call(_after(block, ready), vs)

    for blocks in zip(*cases):
        if len(cases) == 1:
            results = branch(blocks[0])(visiting, ready)
        else:
            results = jax.lax.switch(index, [branch(block) for block in blocks], visiting,
                                     ready)
        ready = _ready(fold(_chosen(list(blocks), index), results))


def _ready(arrays):
    """An int32 scalar that XLA knows only once all `arrays` are computed
    (one element of each), or None without arrays."""
    leaves = jax.tree.leaves(arrays)
    if not leaves:
        return None
    return functools.reduce(jnp.maximum, [
        jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
        for x in leaves])


def _after(block: Block, ready) -> Block:
    """`block`, its kernel call made to wait for `ready` (see _ready): the key
    lengths, unchanged, computed from it."""
    if ready is None:
        return block
    above = jnp.maximum(ready, 2**30)  # above any length, whatever `ready` is
    return block._replace(kv_len=jnp.minimum(block.kv_len, above))


def _fold_into(parts: list, which, update: tuple, empty: tuple, combine):
    """parts[which] = combine(parts[which], *update), for a static or dynamic
    `which` (then every part is combined: with the update where it is the
    one, with `empty`, which changes nothing, elsewhere)."""
    if isinstance(which, int):
        parts[which] = combine(parts[which], *update)
        return
    for p in range(len(parts)):
        parts[p] = combine(parts[p], *(jnp.where(which == p, u, e) for u, e in zip(update, empty)))


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


def merge(out, lse, part_out, part_lse):
    """Combines two partial softmax results over disjoint key sets."""
    new = jnp.logaddexp(lse, part_lse)
    safe = jnp.where(jnp.isfinite(new), new, 0)
    weight = lambda l: jnp.exp(l - safe)[..., None]  # noqa: E741,E731  0 where l = -inf
    return out * weight(lse) + part_out.astype(out.dtype) * weight(part_lse), new


def add_sinks(out, lse, sinks):
    """(out, lse) with the sinks (1|B, N) as one more key that carries no value:
    the merge with an empty partial result whose lse is the sink logit."""
    sink_lse = jnp.broadcast_to(sinks[:, None, :], lse.shape).astype(lse.dtype)
    return merge(out, lse, jnp.zeros((), out.dtype), sink_lse)


def forward(kernels: Kernels, ring: Ring, options: Options, ops: Operands, vary=lambda x: x):
    """(out, lse) of the whole sequence for this device's query rows.
    `vary` marks arrays made here as varying over the manual axes (shard_map)."""
    local, _ = _prepare(ring, ops, options)
    dtype = ops.query.dtype
    acc = accumulation_dtype(dtype)
    # Per query part; whole arrays only (no partial updates, which also keeps
    # clear of the XLA CPU crash of jax 0.11.2 on an update covering its whole
    # operand inside shard_map: benchmarks/probe_ring_compile.py).
    out = [vary(jnp.zeros(q.shape, acc)) for q in local.ops.query]
    lse = [vary(jnp.full(q.shape[:3], -jnp.inf, acc)) for q in local.ops.query]

    def call(block, visiting):
        return kernels.fwd(_block_options(options, block),
                           *_block_operands(local.ops, visiting, block, options))

    def step(s, visiting, state):
        parts = list(zip(*state))  # (out, lse) per query part

        def fold(block, results):
            _fold_into(parts, block.q_part, results, (0, -jnp.inf),
                       lambda a, o, l: merge(*a, o, l))
            # No wait here: measured, it raised the forward's peak
            # (benchmarks/RESULTS.md, "Ring attention").
            return None

        _run_step(ring, options, local, s, visiting, call, fold)
        return visiting, tuple(list(x) for x in zip(*parts))

    visiting = _Visiting(local.ops.key, local.ops.value, local.ops.kv_segments)
    _, (out, lse) = _around(ring, step, visiting, (out, lse))
    if options.has_sinks:
        out, lse = zip(*(add_sinks(o, l, ops.sinks) for o, l in zip(out, lse)))
    return (_join(ring, [o.astype(dtype) for o in out], 1, ring.q_rows),
            _join(ring, list(lse), 1, ring.q_rows))


def _add_block(acc, part, block: Block):
    """acc[block's rows, block's columns] += part (bias gradient)."""
    start = [0, 0, block.q_part * part.shape[2] if acc.shape[2] > 1 else 0,
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
    dtype = ops.query.dtype
    acc = accumulation_dtype(dtype)
    zeros = lambda x: vary(jnp.zeros(x.shape, acc))  # noqa: E731
    dq, dbias = [zeros(q) for q in local.ops.query], zeros(local.ops.bias)

    def call(block, visiting):
        p = block.q_part
        return kernels.bwd(_block_options(options, block),
                           *_block_operands(local.ops, visiting, block, options),
                           lse[p], dout[p], delta[p])

    def step(s, visiting, state):
        dk, dv = list(visiting.dkey), list(visiting.dvalue)
        dq, dbias = list(state[0]), [state[1]]
        add = lambda a, g: a + g.astype(a.dtype)  # noqa: E731

        def fold(block, grads):
            _fold_into(dq, block.q_part, grads[:1], (0,), add)
            _fold_into(dk, block.kv_part, grads[1:2], (0,), add)
            _fold_into(dv, block.kv_part, grads[2:3], (0,), add)
            if options.has_bias:
                dbias[0] = _add_block(dbias[0], grads[3], block)
            return dq, dk, dv

        _run_step(ring, options, local, s, visiting, call, fold)
        return visiting._replace(dkey=dk, dvalue=dv), (dq, dbias[0])

    k, v = local.ops.key, local.ops.value
    visiting = _Visiting(k, v, local.ops.kv_segments, [zeros(x) for x in k],
                         [zeros(x) for x in v])
    visiting, (dq, dbias) = _around(ring, step, visiting, (dq, dbias))
    # The gradient accumulators made n-1 moves with their blocks: one more
    # brings them home (in the balanced layout, straight to the contiguous
    # layout: each chunk goes to its owner in one move).
    offset = 1 if ring.size > 1 else 0
    dk, dv = (_join(ring, [x.astype(dtype) for x in grads], 1, ring.kv_rows, offset)
              for grads in (visiting.dkey, visiting.dvalue))
    dbias = _columns_from_layout(ring, dbias)
    if ring.zigzag and dbias.shape[2] > 1:
        dbias = _from_balanced(ring, dbias, 2, ring.q_rows)
    return (_join(ring, [x.astype(dtype) for x in dq], 1, ring.q_rows), dk, dv,
            dbias.astype(ops.bias.dtype))

"""How the kernel calls run on sharded arrays under ``jax.jit``: custom
partitioning of the two primitives, with a Shardy rule for propagation.

The query's sharding decides the plan (:class:`Plan`):
  * batch: every device runs the kernels on its batch rows;
  * heads: every device runs its query heads. GQA: query head n uses key/value
    head n // (N // K). When the head shards divide K, key/value are sharded
    the same way and each device holds exactly the key/value heads its query
    heads use. Otherwise key/value stay replicated along heads and each device
    picks the heads it needs (one when a shard's query heads share one, else
    one per query head); their gradients are summed over the head shards;
  * sequence: ring attention over the sequence axes (jax_mfa/_ring.py); a
    ring size that does not divide T or S pads the blocks (_pad_ring).
Dropout draws from global indices: the seed operand carries each row's global
batch index and the counter origin, which a device's program moves to its
first head (and the ring to each block's first query and key row).
Every operand dim has a role (:data:`ROLES`); a role maps to the plan's mesh
axes, so an operand's sharding follows from its roles. A broadcast dim (size 1)
stays replicated, and the gradient of a broadcast bias is summed over the
axes its broadcast dims would have been sharded on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_mfa import _philox, _ring
from jax_mfa._arguments import NUM_OPERANDS, Operands

# Roles of each dim of every operand and result of the two primitives. A new
# operand is one line here (and its place in OPERANDS / RESULTS).
ROLES = {
    "query": ("batch", "q_seq", "q_heads", None),
    "key": ("batch", "kv_seq", "kv_heads", None),
    "value": ("batch", "kv_seq", "kv_heads", None),
    # bias/mask are (B, N, T, S) broadcasts; their keys are whole on every
    # device (rows of a device's queries against all keys).
    "bias": ("batch", "q_heads", "q_seq", "kv_all"),
    "mask": ("batch", "q_heads", "q_seq", "kv_all"),
    "q_lengths": ("batch",),
    "kv_lengths": ("batch",),
    # Packed sequences: ids of the query rows and of the keys.
    "q_segments": ("batch", "q_seq"),
    "kv_segments": ("batch", "kv_seq"),
    # (1 or B, N): one logit per query head.
    "sinks": ("batch", "q_heads"),
    # (B, 6): key words, (global) batch index and counter origin of each row.
    "dropout_seed": ("batch", None),
    "lse": ("batch", "q_seq", "q_heads"),
    "dout": ("batch", "q_seq", "q_heads", None),
    "delta": ("batch", "q_seq", "q_heads"),
}
FWD_OPERANDS = ("query", "key", "value", "bias", "mask", "q_lengths", "kv_lengths",
                "q_segments", "kv_segments", "sinks", "dropout_seed")
OPERANDS = {"fwd": FWD_OPERANDS, "bwd": FWD_OPERANDS + ("lse", "dout", "delta")}
SEED = FWD_OPERANDS.index("dropout_seed")
# Results share the roles of the operand they mirror.
RESULTS = {"fwd": ("query", "lse"), "bwd": ("query", "key", "value", "bias")}


def _role_sizes(shapes) -> dict[str, int]:
    """The full size of each role, from the query and key shapes."""
    B, T, N, _ = shapes[0]
    _, S, K, _ = shapes[1]
    return dict(batch=B, q_seq=T, q_heads=N, kv_seq=S, kv_heads=K, kv_all=S)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Mesh axes for each role (empty: replicated)."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    seq: tuple[str, ...] = ()
    kv_heads_sharded: bool = False  # else replicated, each device picks its heads

    def axes(self, role) -> tuple[str, ...]:
        return {"batch": self.batch, "q_heads": self.heads, "q_seq": self.seq,
                "kv_seq": self.seq, "kv_heads": self.heads if self.kv_heads_sharded else ()
                }.get(role, ())

    def spec(self, name: str, shape, sizes) -> P:
        """PartitionSpec of operand `name`: a dim is sharded when its role is
        and it is not broadcast."""
        return P(*(_spec_entry(self.axes(role)) if role and dim == sizes[role] and dim > 1
                   else None for role, dim in zip(ROLES[name], shape)))

    def broadcast_axes(self, name: str, shape, sizes) -> tuple[str, ...]:
        """Axes along which operand `name` is broadcast although its role is
        sharded: the gradient of such an operand sums over them."""
        return tuple(a for role, dim in zip(ROLES[name], shape)
                     if role and dim != sizes[role] for a in self.axes(role))


def _spec_entry(axes):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def make_plan(mesh, shapes, specs, fused: bool = True) -> Plan:
    """The plan for a call whose query and key have PartitionSpecs specs[0:2].
    Segment ids travel with the ring's blocks and sinks shard with the query
    heads."""
    sizes = _role_sizes(shapes)
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
    padded = [tuple(s) + (None,) * (4 - len(s)) for s in specs[:2]]
    q_spec, k_spec = padded
    batch = _axes(q_spec[0])
    if sizes["batch"] % size(batch):
        batch = ()
    heads = _axes(q_spec[2])
    if set(heads) & set(batch) or sizes["q_heads"] % size(heads):
        heads = ()
    seq = _axes(q_spec[1]) or _axes(k_spec[1])
    # Lengths that the ring size does not divide are padded (_pad_ring).
    if not fused or set(seq) & (set(batch) | set(heads)):
        seq = ()
    return Plan(batch, heads, seq, kv_heads_sharded=sizes["kv_heads"] % size(heads) == 0)


# ----------------------------------------------------------------------------
# Per-device program


def _kv_head_index(plan: Plan, mesh, N: int, K: int):
    """Key/value heads the device's query heads use, when key/value heads are
    replicated (the head shards do not divide K)."""
    shards = math.prod(mesh.shape[a] for a in plan.heads)
    local, group = N // shards, N // K
    index = (jax.lax.axis_index(plan.heads) * local + jnp.arange(local)) // group
    # A shard's query heads all share one key/value head, or each uses its own.
    return index[:1] if group % local == 0 else index


def _pad_ring(args, options, axes, sizes):
    """When the ring size does not divide T or S, XLA hands every device
    ceil(T/n) and ceil(S/n) rows, the last ones padding of unspecified
    content. Padded keys are cut off by the key/value lengths (clipped to S),
    padded query rows by the query lengths (clipped to T): they produce
    nothing and their results are dropped. Their contents are zeroed so that
    nothing undefined (NaN) reaches a kernel. The bias/mask key dim (whole on
    every device) is padded to the ring's n * ceil(S/n) columns.
    Returns (args, options)."""
    T, S = sizes["q_seq"], sizes["kv_seq"]
    q, k = args[0], args[1]
    B, L, Ls = q.shape[0], q.shape[1], k.shape[1]
    index = jax.lax.axis_index(axes)
    q_valid = index * L + jnp.arange(L) < T
    kv_valid = index * Ls + jnp.arange(Ls) < S
    rows = lambda x, valid, dim: jnp.where(  # noqa: E731
        valid.reshape((-1,) + (1,) * (x.ndim - dim - 1)), x, jnp.zeros((), x.dtype))
    args = list(args)
    args[0] = rows(q, q_valid, 1)
    args[1], args[2] = rows(args[1], kv_valid, 1), rows(args[2], kv_valid, 1)
    for i in (3, 4):  # bias, mask: (B|1, N|1, rows|1, S|1)
        x = args[i]
        if x.shape[2] > 1:
            x = rows(x, q_valid, 2)
        if x.shape[3] > 1:
            x = _ring._pad_dim(x, 3, jax.lax.axis_size(axes) * Ls - S)
        args[i] = x
    full = lambda given, on, total: (jnp.minimum(given, total) if on  # noqa: E731
                                     else jnp.full((B,), total, jnp.int32))
    args[5] = full(args[5], options.has_q_lengths, T)
    args[6] = full(args[6], options.has_kv_lengths, S)
    if len(args) > NUM_OPERANDS:  # backward: lse, dout, delta of the padded rows
        for i in range(NUM_OPERANDS, NUM_OPERANDS + 3):
            args[i] = rows(args[i], q_valid, 1)
    options = dataclasses.replace(options, has_q_lengths=True, has_kv_lengths=True)
    return args, options


def _local_program(kind, options, backend, kernel_call, plan: Plan, mesh, shapes):
    """The function each device runs on its shards."""
    sizes = _role_sizes(shapes)
    N, K = sizes["q_heads"], sizes["kv_heads"]
    T_rows, S_rows = sizes["q_seq"], sizes["kv_seq"]
    pick_heads = bool(plan.heads) and not plan.kv_heads_sharded
    n = math.prod(mesh.shape[a] for a in plan.seq)
    kernels = _ring.Kernels(functools.partial(_call, kernel_call, "fwd", backend),
                            functools.partial(_call, kernel_call, "bwd", backend))

    def program(*args):
        args = list(args)
        if pick_heads:
            heads = _kv_head_index(plan, mesh, N, K)
            args[1], args[2] = (jnp.take(a, heads, axis=2) for a in args[1:3])
        if plan.heads and options.dropout_rate > 0:  # the mask of this device's heads
            local = args[0].shape[2]
            args[SEED] = _philox.shift_origin(args[SEED],
                                              head=jax.lax.axis_index(plan.heads) * local)
        if plan.seq:
            ring_options = options
            padded = n * args[0].shape[1] != T_rows or n * args[1].shape[1] != S_rows
            if padded:
                args, ring_options = _pad_ring(args, options, plan.seq, sizes)
            ops = Operands(*args[:NUM_OPERANDS])
            ring = _ring.Ring.make(plan.seq, n, args[0].shape[1], args[1].shape[1],
                                   ring_options)
            if kind == "fwd":
                results = list(_ring.forward(kernels, ring, ring_options, ops))
            else:
                results = list(_ring.backward(kernels, ring, ring_options, ops,
                                              *args[NUM_OPERANDS:]))
                if padded and options.has_bias and results[3].shape[3] > 1:
                    results[3] = results[3][..., :S_rows]
        else:
            results = list(kernel_call(kind, options, backend, *args))
        if kind == "bwd":
            if pick_heads:  # dk, dv: back to all K heads, summed over head shards
                for i in (1, 2):
                    full = jnp.zeros(results[i].shape[:2] + (K,) + results[i].shape[3:],
                                     results[i].dtype)
                    results[i] = jax.lax.psum(full.at[:, :, heads].add(results[i]), plan.heads)
            axes = plan.broadcast_axes("bias", shapes[3], sizes)
            if options.has_bias and axes:
                results[3] = jax.lax.psum(results[3], axes)
        return tuple(results)

    return program


def _call(kernel_call, kind, backend, options, *args):
    return kernel_call(kind, options, backend, *args)


# ----------------------------------------------------------------------------
# custom_partitioning callbacks


def _shardings(kind, plan: Plan, mesh, shapes):
    sizes = _role_sizes(shapes)
    names = OPERANDS[kind] + RESULTS[kind]
    return [NamedSharding(mesh, plan.spec(name, shape, sizes))
            for name, shape in zip(names, shapes)]


def _plan_for(kind, options, backend, mesh, arg_shapes, result_shape):
    results = result_shape if isinstance(result_shape, (tuple, list)) else (result_shape,)
    shapes = [tuple(a.shape) for a in (*arg_shapes, *results)]
    specs = [getattr(a.sharding, "spec", P()) for a in arg_shapes[:2]]
    return make_plan(mesh, shapes, specs, fused=backend != "xla"), shapes


def _partition(kernel_call, kind, options, backend, mesh, arg_shapes, result_shape):
    plan, shapes = _plan_for(kind, options, backend, mesh, arg_shapes, result_shape)
    shardings = _shardings(kind, plan, mesh, shapes)
    n = len(arg_shapes)
    program = _local_program(kind, options, backend, kernel_call, plan, mesh, shapes)
    return mesh, program, tuple(shardings[n:]), tuple(shardings[:n])


def _infer_sharding(kernel_call, kind, options, backend, mesh, arg_shapes, result_shape):
    return _partition(kernel_call, kind, options, backend, mesh, arg_shapes, result_shape)[2]


def _sharding_rule(kind, options, backend, mesh, operand_types, result_types):
    """Shardy rule: one factor per role (batch b, query rows t, query heads n,
    key rows s, key/value heads k); other dims and broadcast dims get factors
    of their own that must stay replicated."""
    shapes = [tuple(t.shape) for t in (*operand_types, *result_types)]
    sizes = _role_sizes(shapes)
    factor = dict(batch="b", q_seq="t", q_heads="n", kv_seq="s", kv_heads="k")
    names = OPERANDS[kind] + RESULTS[kind]
    replicated, dims_of = [], []
    for name, shape in zip(names, shapes):
        dims = []
        for role, dim in zip(ROLES[name], shape):
            if role in factor and dim == sizes[role]:
                dims.append(factor[role])
            else:
                replicated.append(f"r{len(replicated)}")
                dims.append(replicated[-1])
        dims_of.append(" ".join(dims))
    n = len(operand_types)
    rule = ", ".join(dims_of[:n]) + " -> " + ", ".join(dims_of[n:])
    return rule, {"need_replication_factors": tuple(replicated)}


def partitioned(kernel_call: Callable):
    """`kernel_call(kind, options, backend, *args)` (the FFI call on whole
    arrays) made to run per shard on several devices."""
    call = custom_partitioning(kernel_call, static_argnums=(0, 1, 2))
    call.def_partition(partition=functools.partial(_partition, kernel_call),
                       infer_sharding_from_operands=functools.partial(_infer_sharding,
                                                                      kernel_call),
                       sharding_rule=_sharding_rule)
    return call

"""The JAX internals jax_mfa still needs, in one place (supported: jax 0.10, 0.11).

Everything else uses public APIs (jax.extend.core.Primitive, jax.interpreters
batching/mlir/ad registries, jax.ffi, jax.sharding.get_abstract_mesh,
custom_partitioning). What is left has no public equivalent yet; when JAX
moves or removes it, this module is the only one to change.
"""

from __future__ import annotations

from jax._src import dispatch as _dispatch


def require_devices_during_lowering(*primitives) -> None:
    """Make JAX pass the device assignment to these primitives' lowerings.

    Why private: custom_partitioning (our per-batch-shard kernel calls) needs
    the devices while lowering, and JAX's only switch for a primitive that
    wraps it is this registry (JAX's own callbacks and custom_partitioning_p
    register the same way); there is no public API for it in jax 0.10/0.11.
    """
    _dispatch.prim_requires_devices_during_lowering.update(primitives)

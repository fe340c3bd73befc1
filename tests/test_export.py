"""jax.export: a function using jax_mfa serializes, deserializes and runs,
forward and gradient. The fused kernels are XLA FFI custom calls, which
jax.export accepts only when told (DisabledSafetyCheck.custom_call, one per
target); the plain-JAX implementations need nothing. The deserialized module
runs where the targets are registered (jax_mfa imported)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

import jax_mfa
from jax_mfa import _native

# jax.export's serialization needs flatbuffers (in the project's test extra).
pytest.importorskip("flatbuffers", reason="flatbuffers (pip install '.[test]') is not installed")
from support import IMPLEMENTATIONS, FUSED, dtype_for, random_array, relative_error


def _safety_checks(impl: str):
    if impl not in FUSED:
        return []
    return [export.DisabledSafetyCheck.custom_call(_native.ffi_target(kind, impl))
            for kind in ("fwd", "bwd")]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_export_roundtrip(impl, rng):
    dtype = dtype_for(impl)
    q = random_array(rng, (2, 13, 4, 8), dtype)
    k = random_array(rng, (2, 11, 2, 8), dtype)
    v = random_array(rng, (2, 11, 2, 8), dtype)
    bias = random_array(rng, (2, 4, 13, 11), dtype)

    def loss(q, k, v, bias):
        out = jax_mfa.attention(q, k, v, bias, is_causal=True, implementation=impl)
        return jnp.sum(jnp.sin(out))

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    exported = export.export(f, platforms=["cpu"], disabled_checks=_safety_checks(impl))(
        q, k, v, bias)
    restored = export.deserialize(exported.serialize())
    got = restored.call(q, k, v, bias)
    want = f(q, k, v, bias)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert relative_error(a, b) <= (1e-12 if dtype == jnp.float64 else 1e-6)


@pytest.mark.parametrize("impl", FUSED[:1])
def test_export_without_disabled_check_names_the_target(impl, rng):
    q = random_array(rng, (1, 5, 1, 4), jnp.float32)
    f = jax.jit(lambda q: jax_mfa.attention(q, q, q, implementation=impl))
    with pytest.raises(ValueError, match=_native.ffi_target("fwd", impl)):
        export.export(f, platforms=["cpu"])(q)

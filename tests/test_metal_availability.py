"""Availability of the "metal" implementation means usable, and says why not.

On Linux there is no Metal backend, so the Mac situations are simulated at the
boundary jax_mfa._native exposes (the registered FFI targets and the
extension's metal_diagnostics); the selection logic under test is the real one.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
from jax_mfa import _api, _native


def test_diagnostics_cover_every_implementation():
    reasons = jax_mfa.implementation_diagnostics()
    assert set(reasons) == {"metal", "cpu", "xla", "xla-blockwise", "metal-emulated"}
    available = jax_mfa.available_implementations()
    for name, reason in reasons.items():
        assert (reason is None) == (name in available), (name, reason)
        assert reason is None or reason.strip()


def test_metal_reason_here():
    ok, reason, _ = _native.metal_diagnostics()
    if "metal" not in _native.registered_backends():
        assert not ok and "no Metal backend" in reason


@pytest.fixture
def mac_build(monkeypatch):
    """A build with the Metal backend whose GPU path is unusable."""
    registered = _native.registered_backends() | {"metal"}
    monkeypatch.setattr(_native, "registered_backends", lambda: registered)
    reason = "compiling the Metal kernels (float32, head bucket 64) failed: planted error"
    monkeypatch.setattr(_native, "metal_diagnostics", lambda: (False, reason, "Apple M1"))
    _api._warn_metal_fallback.cache_clear()
    yield reason
    _api._warn_metal_fallback.cache_clear()


def test_unusable_metal_is_not_available_and_says_why(mac_build):
    assert "metal" not in jax_mfa.available_implementations()
    assert jax_mfa.implementation_diagnostics()["metal"] == mac_build
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 2, 8)), jnp.float32)
    with pytest.raises(ValueError, match="planted error"):
        jax_mfa.attention(q, q, q, implementation="metal")


def test_none_falls_back_to_cpu_with_one_warning(mac_build):
    q = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 2, 8)), jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        want = jax_mfa.attention(q, q, q, implementation="cpu")
        got1 = jax_mfa.attention(q, q, q)
        got2 = jax_mfa.attention(q, q, q)
    metal = [w for w in caught if "Metal backend is unavailable" in str(w.message)]
    assert len(metal) == 1, [str(w.message) for w in caught]
    assert "planted error" in str(metal[0].message) and "'cpu'" in str(metal[0].message)
    np.testing.assert_array_equal(np.asarray(got1), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got2), np.asarray(want))


def test_usable_metal_is_preferred(monkeypatch):
    registered = _native.registered_backends() | {"metal"}
    monkeypatch.setattr(_native, "registered_backends", lambda: registered)
    monkeypatch.setattr(_native, "metal_diagnostics", lambda: (True, "", "Apple M3"))
    assert jax_mfa.available_implementations()[0] == "metal"
    assert jax_mfa.implementation_diagnostics()["metal"] is None
    assert _api._resolve(None, work=1 << 30) == "metal"
    assert _api._resolve(None, work=16) == "cpu"  # small problems stay on the CPU

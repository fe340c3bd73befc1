"""Loads the native extension and registers its FFI handlers with JAX, once."""

from __future__ import annotations

import functools

import jax


@functools.cache
def extension():
    """The `_jax_mfa` module, or None when the package was not built."""
    try:
        from jax_mfa import _jax_mfa
    except ImportError:
        return None
    for name, handler in _jax_mfa.registrations().items():
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return _jax_mfa


def ffi_target(kind: str, backend: str) -> str:
    """FFI target name for pass `kind` ("fwd"/"bwd") of `backend` ("cpu", ...)."""
    if extension() is None:
        raise RuntimeError("jax_mfa's native extension is not built; reinstall the package")
    return f"jax_mfa_attention_{kind}_{backend.replace('-', '_')}"


def registered_backends() -> frozenset[str]:
    """Backends with compiled FFI handlers in this build (before run-time checks)."""
    ext = extension()
    if ext is None:
        return frozenset()
    names = ext.registrations().keys()
    return frozenset(n[len("jax_mfa_attention_fwd_"):].replace("_", "-")
                     for n in names if n.startswith("jax_mfa_attention_fwd_"))

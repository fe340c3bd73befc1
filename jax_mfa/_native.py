"""Finds the native extension and registers its FFI handlers with JAX, once."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import pathlib
import sys

import jax

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_load_error: str | None = None


def _extension_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in directory.glob("_jax_mfa*" + s)]


def _has_extension(directory: pathlib.Path) -> bool:
    return bool(_extension_files(directory))


@functools.cache
def native_dir() -> pathlib.Path | None:
    """Directory of the built native pieces (extension, emulator runtime, headers).

    Normally this package's own directory. From a source checkout without an
    in-place build (e.g. `python -m jax_mfa` run in the repository root, which
    puts the sources ahead of the installed package on sys.path), it is the
    installed distribution's package directory.
    """
    if _has_extension(_PACKAGE_DIR):
        return _PACKAGE_DIR
    try:
        installed = pathlib.Path(importlib.metadata.distribution("jax_mfa").locate_file("jax_mfa"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return installed if _has_extension(installed) else None


@functools.cache
def extension():
    """The `_jax_mfa` module (FFI targets registered), or None if not built."""
    global _load_error
    directory = native_dir()
    if directory is None:
        _load_error = "the native extension _jax_mfa is not built or installed"
        return None
    try:
        if directory == _PACKAGE_DIR:
            from jax_mfa import _jax_mfa as module
        else:
            path = _extension_files(directory)[0]
            spec = importlib.util.spec_from_file_location("jax_mfa._jax_mfa", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["jax_mfa._jax_mfa"] = module
    except ImportError as e:
        _load_error = f"loading the native extension failed: {e}"
        return None
    for name, handler in module.registrations().items():
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return module


def load_error() -> str | None:
    """Why the extension is unavailable (None if it loaded)."""
    extension()
    return _load_error


def ffi_target(kind: str, backend: str) -> str:
    """FFI target name for pass `kind` ("fwd"/"bwd") of `backend` ("cpu", ...)."""
    if extension() is None:
        raise RuntimeError(f"jax_mfa: {load_error()}; reinstall the package")
    return f"jax_mfa_attention_{kind}_{backend.replace('-', '_')}"


def registered_backends() -> frozenset[str]:
    """Backends with compiled FFI handlers in this build (before run-time checks)."""
    ext = extension()
    if ext is None:
        return frozenset()
    prefix = "jax_mfa_attention_fwd_"
    return frozenset(n[len(prefix):].replace("_", "-")
                     for n in ext.registrations() if n.startswith(prefix))


@functools.cache
def metal_diagnostics() -> tuple[bool, str, str]:
    """(available, reason, device) of the "metal" backend, checked once.

    Available means usable: this build has the backend, an Apple-silicon GPU
    (Apple7 family, M1 or later) was found, and Apple's Metal compiler built
    the kernels. Otherwise `reason` says which of these failed.
    """
    ext = extension()
    if ext is None:
        return False, str(load_error()), ""
    available, reason, device = ext.metal_diagnostics()
    return bool(available), str(reason), str(device)

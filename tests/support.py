"""Shared helpers for jax_mfa's tests (imported as `support`; tests/conftest.py
holds the fixtures).

* float64 is enabled for the whole session (the reference and the float64 tests
  need it); every float32 input is therefore created explicitly as float32.
* IMPLEMENTATIONS lists the fused implementations available here ("cpu"; later
  "metal-emulated" is picked up automatically from available_implementations()),
  and SIZE_PRESETS maps each to the sizes its tests use (the emulator is slow).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mfa  # noqa: E402
from jax_mfa import _blockwise  # noqa: E402

# Implementations the test matrix runs on: the fused kernels and the blockwise
# JAX implementation ("xla" is the comparison path, tested against the others
# separately).
FUSED_IMPLEMENTATIONS = ("cpu", "metal-emulated", "metal")
TESTED_IMPLEMENTATIONS = FUSED_IMPLEMENTATIONS + ("xla-blockwise",)
IMPLEMENTATIONS = [i for i in jax_mfa.available_implementations()
                   if i in TESTED_IMPLEMENTATIONS]
FUSED = [i for i in IMPLEMENTATIONS if i in FUSED_IMPLEMENTATIONS]

# Small blocks for the blockwise implementation, so that every test shape has
# several blocks, and uneven last ones (defaults: hundreds of rows and keys).
_blockwise.QUERY_BLOCK, _blockwise.KEY_BLOCK = 16, 24
# JAX_MFA_TEST_IMPLEMENTATIONS=cpu,metal-emulated restricts the matrix (e.g. to
# time one implementation); unavailable names are ignored.
if os.environ.get("JAX_MFA_TEST_IMPLEMENTATIONS"):
    _wanted = os.environ["JAX_MFA_TEST_IMPLEMENTATIONS"].split(",")
    IMPLEMENTATIONS = [i for i in IMPLEMENTATIONS if i in _wanted]

# Every implementation available here, fused or not (for tests of semantics
# that all of them must share, e.g. NaN propagation and option validation).
ALL_IMPLEMENTATIONS = IMPLEMENTATIONS + [i for i in jax_mfa.available_implementations()
                                         if i not in IMPLEMENTATIONS]

# float64 runs only on the CPU path (Metal has no float64); float64-only tests
# (numerical gradient checks) use this list, the rest pick dtype_for(impl).
FLOAT64_IMPLEMENTATIONS = [i for i in IMPLEMENTATIONS if i not in ("metal", "metal-emulated")]


def dtype_for(impl: str):
    """The most precise storage dtype `impl` runs: float64, else float32."""
    return jnp.float64 if impl in FLOAT64_IMPLEMENTATIONS else jnp.float32


def same_impl_tolerance(impl: str) -> float:
    """Tolerance for comparing an implementation with itself (e.g. vmap vs a loop)."""
    return 1e-12 if impl in FLOAT64_IMPLEMENTATIONS else 1e-6


# Sizes per implementation. `length` maps the nominal sequence lengths used by
# the test grids (odd values around the 64-wide tiles) to the ones actually run;
# `batch` caps the batch size and `memory_len` is the long-sequence memory test.
SIZE_PRESETS = {
    "cpu": dict(length={1: 1, 17: 17, 37: 37, 65: 65, 130: 130}, batch=3, memory_len=8192),
    "metal-emulated": dict(length={1: 1, 17: 17, 37: 37, 65: 65, 130: 70}, batch=2,
                           memory_len=1024),
    "metal": dict(length={1: 1, 17: 17, 37: 37, 65: 65, 130: 130}, batch=3, memory_len=8192),
    "xla-blockwise": dict(length={1: 1, 17: 17, 37: 37, 65: 65, 130: 130}, batch=3,
                          memory_len=8192),
}


def preset(impl: str) -> dict:
    return SIZE_PRESETS.get(impl, SIZE_PRESETS["cpu"])


def seq_len(impl: str, nominal: int) -> int:
    """The sequence length `impl` runs for a nominal grid length."""
    return preset(impl)["length"].get(nominal, nominal)


def batch_size(impl: str, nominal: int) -> int:
    return min(nominal, preset(impl)["batch"])


def random_array(rng: np.random.Generator, shape, dtype, scale: float = 1.0) -> jax.Array:
    """Standard-normal values (times `scale`) stored in `dtype` (an explicit jax array)."""
    x = (rng.standard_normal(shape) * scale).astype(np.float64 if dtype == jnp.float64
                                                     else np.float32)
    return jnp.asarray(x, dtype=dtype)


def to64(x) -> np.ndarray:
    """The exact float64 value of an array (whatever its storage dtype)."""
    return np.asarray(jnp.asarray(x).astype(jnp.float64))


def accumulation_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def assert_no_nan(*arrays, what="", names=None):
    names = names or [f"#{i}" for i in range(len(arrays))]
    for a, name in zip(arrays, names):
        if a is None:
            continue
        bad = np.argwhere(np.isnan(to64(a)))
        assert not len(bad), (f"{len(bad)} NaN in {what} {name} of shape {np.shape(a)}, "
                              f"first at index {tuple(bad[0])}")


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| over finite entries; entries that
    are -inf/+inf in `expected` must be identical in `actual` (else inf)."""
    a, e = to64(actual), to64(expected)
    assert a.shape == e.shape, (a.shape, e.shape)
    if a.size == 0:
        return 0.0
    inf = ~np.isfinite(e)
    if inf.any() and not np.array_equal(a[inf], e[inf]):
        return float("inf")
    fin = ~inf
    if not fin.any():
        return 0.0
    if not np.isfinite(a[fin]).all():
        return float("inf")
    scale = max(float(np.max(np.abs(e[fin]))), 1e-30)
    return float(np.max(np.abs(a[fin] - e[fin]))) / scale


def assert_nan_pattern_and_close(actual, expected, tol: float, what=""):
    """NaN exactly where `expected` has NaN; elsewhere as relative_error <= tol."""
    a, e = to64(actual), to64(expected)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if not np.array_equal(nan_a, nan_e):
        diff = np.argwhere(nan_a != nan_e)
        raise AssertionError(f"{what}: NaN at {int(nan_a.sum())} entries, expected "
                             f"{int(nan_e.sum())}; first difference at {tuple(diff[0])}")
    err = relative_error(np.where(nan_e, 0, a), np.where(nan_e, 0, e))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


# Relative (to max magnitude) tolerances against the float64 reference for the
# dtypes whose results are checked directly; float16/bfloat16 are instead
# checked against the error of the "xla" implementation fed the same inputs.
TOLERANCE = {
    "float64": dict(out=1e-10, lse=1e-10, grad=1e-10),
    "float32": dict(out=1e-5, lse=1e-5, grad=2e-5),
}
# For float16/bfloat16: kernel error <= HALF_FACTOR * xla error + HALF_FLOOR[dtype].
HALF_FACTOR = 3.0
HALF_FLOOR = {"float16": 2.0**-12, "bfloat16": 2.0**-9}
# The bias gradient is float32 even for float16/bfloat16 inputs, so the "xla"
# path (differentiated by JAX in float32 throughout) has float32-level error
# there. A FlashAttention backward computes delta = rowsum(dO * O) from the
# output O as stored, i.e. rounded to the input dtype, which alone costs about
# one unit roundoff of that dtype relative to max |dbias| (2.4 units seen for
# one float16 case, identically on the cpu and metal-emulated paths). Allow 4.
DBIAS_HALF_FLOOR = {"float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8}


def check_close(actual, expected, dtype, kind: str, *, xla=None, what=""):
    """Asserts `actual` matches the float64 `expected` for storage `dtype`.

    kind: "out", "lse", "grad" or "dbias". For float16/bfloat16, `xla` is the same
    quantity from the "xla" implementation; the kernel may be at most a small
    multiple of its error (plus a tiny floor)."""
    name = jnp.dtype(dtype).name
    err = relative_error(actual, expected)
    if name in TOLERANCE:
        tol = TOLERANCE[name]["grad" if kind == "dbias" else kind]
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({name})"
        return
    assert xla is not None
    xla_err = relative_error(xla, expected)
    floor = {"lse": 1e-6, "dbias": DBIAS_HALF_FLOOR[name]}.get(kind, HALF_FLOOR[name])
    bound = HALF_FACTOR * xla_err + floor
    assert err <= bound, (f"{what}: relative error {err:.3g} > {bound:.3g} "
                          f"(= {HALF_FACTOR} x xla error {xla_err:.3g} + {floor:.3g}, {name})")


def run_with_host_devices(script: str, devices: int = 4, timeout: int = 600) -> str:
    """Runs a Python script in a subprocess whose JAX has `devices` CPU devices
    (jax_mfa from this checkout); asserts it exits 0 and returns its stdout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, cwd=repo, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout

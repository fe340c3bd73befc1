"""pytest fixtures for jax_mfa's tests; shared helpers live in support.py.

* float64 is enabled for the whole session (the reference and the float64 tests
  need it); every float32 input is therefore created explicitly as float32.
* `rng` is a NumPy generator seeded from the test id: reproducible, but
  different for every test.
"""

from __future__ import annotations

import zlib

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded by the test id: fresh inputs per test, reproducible."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))

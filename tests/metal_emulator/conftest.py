import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax_mfa.metal_emulator as me  # noqa: E402

KERNELS = os.path.join(os.path.dirname(__file__), "kernels")


@pytest.fixture(scope="session")
def kernel_lib():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = me.load(os.path.join(KERNELS, name))
        return cache[name]

    return get

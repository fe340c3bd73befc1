import os

import pytest

import jax_mfa.metal_emulator as me

KERNELS = os.path.join(os.path.dirname(__file__), "kernels")


@pytest.fixture(scope="session")
def kernel_lib():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = me.load(os.path.join(KERNELS, name))
        return cache[name]

    return get

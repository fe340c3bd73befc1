"""Peer suite: MLX's Metal kernels, from the mlx-metal wheel's unchanged sources, on the emulator.

MLX's steel GEMM, steel attention forward and sdpa_vector kernels are known to
run correctly on Apple GPUs. Here they run with every checker on (races,
divergence, bounds, write conflicts), some under random schedules, and are
compared with NumPy float64 references (mlx_peer.assert_close: float32 within
a small multiple of NumPy's own float32 error, float16/bfloat16 within one unit
of the storage precision).

The default run takes a representative subset; the full grid is marked slow
(`python -m pytest -m slow tests/metal_emulator/test_mlx_peer.py`). The wheel
is downloaded once into ~/.cache/jax_mfa (JAX_MFA_CACHE_DIR); without network
the tests skip, saying so.
"""

import itertools
import os
import sys

import numpy as np
import pytest

import jax_mfa.metal_emulator as me

sys.path.insert(0, os.path.dirname(__file__))
import mlx_peer as mp  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16"]
TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]


def _gemm_case(dtype, ta, tb, M, N, K, batch=1, addmm=None, broadcast=False, seed=None, rng_seed=0):
    lib = mp.load("steel_gemm.metal")
    rng = np.random.default_rng(rng_seed)
    a_rows, a_cols = (K, M) if ta else (M, K)
    b_rows, b_cols = (N, K) if tb else (K, N)
    kw = {} if seed is None else {"seed": seed}
    if broadcast:  # batch (2, 3): A varies along both, B only along the second (stride 0 along the first)
        a = mp.random(rng, (6, a_rows, a_cols), dtype)
        b = mp.random(rng, (3, b_rows, b_cols), dtype)
        d, _ = mp.gemm(lib, dtype, ta, tb, a, b, batch_shape=(2, 3),
                       batch_strides=((3 * a[0].size, a[0].size), (0, b[0].size)), **kw)
        b = np.tile(b, (2, 1, 1))
        ref, err = mp.gemm_reference(ta, tb, a, b)
    else:
        a = mp.random(rng, (batch, a_rows, a_cols), dtype)
        b = mp.random(rng, (batch, b_rows, b_cols), dtype)
        if addmm is None:
            d, _ = mp.gemm(lib, dtype, ta, tb, a, b, **kw)
            ref, err = mp.gemm_reference(ta, tb, a, b)
        else:
            alpha, beta = addmm
            c = mp.random(rng, (batch, M, N), dtype)
            # C padded to whole 32-row blocks: MLX's apply_epilogue_safe reads rows of C past M
            # (test_gemm_epilogue_reads_past_c).
            rows = -(-M // mp.GEMM_BLOCK["bm"]) * mp.GEMM_BLOCK["bm"]
            c_padded = np.zeros((batch, rows, N), c.dtype)
            c_padded[:, :M] = c
            d, _ = mp.gemm(lib, dtype, ta, tb, a, b, c=c_padded, alpha=alpha, beta=beta, **kw)
            ref, err = mp.gemm_reference(ta, tb, a, b, c, alpha, beta)
    mp.assert_close(d, ref, dtype, err)


# -- default subset ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype,ta,tb", [("float32", False, False), ("float32", True, False),
                                         ("float16", False, True), ("bfloat16", True, True)])
def test_gemm(dtype, ta, tb):
    _gemm_case(dtype, ta, tb, 45, 70, 53)


def test_gemm_batched_random_schedule():
    _gemm_case("float16", False, False, 40, 33, 24, batch=3, seed=7)


def test_gemm_broadcast_batch():
    _gemm_case("bfloat16", False, True, 33, 32, 16, broadcast=True)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0)])
def test_gemm_addmm(alpha, beta):
    _gemm_case("float32", False, False, 50, 40, 24, addmm=(alpha, beta))


def test_gemm_epilogue_reads_past_c():
    """MLX's apply_epilogue_safe checks only the column bound: with M not a multiple of the block and
    C exactly M rows long, it reads rows of C past M. The checker must report it (C padded: passes,
    test_gemm_addmm)."""
    lib = mp.load("steel_gemm.metal")
    rng = np.random.default_rng(3)
    M, N, K = 50, 40, 24
    a = mp.random(rng, (1, M, K), "float32")
    b = mp.random(rng, (1, K, N), "float32")
    c = mp.random(rng, (1, M, N), "float32")
    with pytest.raises(me.OutOfBoundsError, match=r"out-of-bounds read .* of buffer\(2\)"):
        mp.gemm(lib, "float32", False, False, a, b, c=c, alpha=0.5, beta=2.0)


def test_gemm_absent_arguments_dead_reads():
    """Without use_out_source, C and addmm_params do not exist (nothing bound at 2 and 5); MLX's GEMM
    still reads addmm_params->alpha, a read Apple's compiler removes. Neither the checker nor an
    unchecked run may fail on it."""
    lib = mp.load("steel_gemm.metal")
    rng = np.random.default_rng(4)
    a = mp.random(rng, (1, 40, 24), "float32")
    b = mp.random(rng, (1, 24, 36), "float32")
    ref, err = mp.gemm_reference(False, False, a, b)
    for check in (True, False):
        d, _ = mp.gemm(lib, "float32", False, False, a, b, check=check)
        mp.assert_close(d, ref, "float32", err)


def _attention_inputs(rng, dtype, D, mask_kind, H, H_kv, T, S):
    """q (1, H, T, D), k and v (1, H_kv, S, D), and a bool (True: keep) or additive mask or None."""
    q = mp.random(rng, (1, H, T, D), dtype)
    k = mp.random(rng, (1, H_kv, S, D), dtype)
    v = mp.random(rng, (1, H_kv, S, D), dtype)
    mask = None
    if mask_kind == "bool":
        mask = rng.random((1, H, T, S)) < 0.7
        # every row keeps a key, also under MLX's bottom-right causal mask
        mask[..., np.arange(T), np.arange(T) + S - T] = True
    elif mask_kind == "float":
        mask = mp.random(rng, (1, H, T, S), dtype)
    return q, k, v, mask


def _attention_case(dtype, D, causal, mask_kind, H=4, H_kv=2, T=45, S=70, seed=None, rng_seed=0):
    lib = mp.load("steel_attention.metal")
    q, k, v, mask = _attention_inputs(np.random.default_rng(rng_seed), dtype, D, mask_kind, H, H_kv, T, S)
    kw = {} if seed is None else {"seed": seed}
    o, _ = mp.attention(lib, dtype, q, k, v, D ** -0.5, causal, mask, **kw)
    ref, err = mp.attention_reference(q, k, v, D ** -0.5, causal, mask)
    mp.assert_close(o, ref, dtype, err)


@pytest.mark.parametrize("dtype,D,causal,mask", [("float32", 64, True, "bool"), ("float16", 128, False, "float"),
                                                 ("bfloat16", 64, False, None)])
def test_attention(dtype, D, causal, mask):
    _attention_case(dtype, D, causal, mask)


def test_attention_random_schedule():
    _attention_case("float32", 128, True, None, H=2, H_kv=1, T=33, S=40, seed=11)


def _vector_case(dtype, D, causal, mask_kind, two_pass, S=70, T=2, H=4, H_kv=2, blocks=32, seed=None, rng_seed=0):
    lib = mp.load("sdpa_vector.metal")
    q, k, v, mask = _attention_inputs(np.random.default_rng(rng_seed), dtype, D, mask_kind, H, H_kv, T, S)
    kw = {} if seed is None else {"seed": seed}
    if two_pass:
        o, _ = mp.sdpa_vector_2pass(lib, dtype, q, k, v, D ** -0.5, blocks, causal, mask, **kw)
    else:
        o, _ = mp.sdpa_vector(lib, dtype, q, k, v, D ** -0.5, causal, mask, **kw)
    ref, err = mp.attention_reference(q, k, v, D ** -0.5, causal, mask)
    mp.assert_close(o, ref, dtype, err)


@pytest.mark.parametrize("dtype,D,causal,mask,two_pass", [("float32", 64, False, "bool", False),
                                                          ("bfloat16", 128, True, None, True),
                                                          ("float16", 64, False, None, True)])
def test_sdpa_vector(dtype, D, causal, mask, two_pass):
    _vector_case(dtype, D, causal, mask, two_pass)


def test_sdpa_vector_32768_keys():
    _vector_case("float16", 64, False, None, True, S=32768, T=1, H=2, H_kv=1, blocks=256)
    _vector_case("float16", 64, False, None, False, S=32768, T=1, H=2, H_kv=1)


def test_sdpa_vector_random_schedule():
    _vector_case("float32", 64, True, None, False, seed=5)


# -- full grid (slow) ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta,tb", TRANSPOSES)
@pytest.mark.parametrize("shape", [(32, 64, 32), (45, 70, 53), (1, 33, 100)])
def test_gemm_grid(dtype, ta, tb, shape):
    _gemm_case(dtype, ta, tb, *shape)
    _gemm_case(dtype, ta, tb, *shape, batch=2, seed=1)
    _gemm_case(dtype, ta, tb, *shape, broadcast=True)
    _gemm_case(dtype, ta, tb, *shape, addmm=(0.5, 2.0))
    _gemm_case(dtype, ta, tb, *shape, addmm=(1.0, 1.0), seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal,mask", list(itertools.product([False, True], [None, "bool", "float"])))
def test_attention_grid(dtype, D, causal, mask):
    _attention_case(dtype, D, causal, mask)
    _attention_case(dtype, D, causal, mask, H=2, H_kv=2, T=64, S=64, seed=3)
    _attention_case(dtype, D, causal, mask, H=3, H_kv=1, T=21, S=40)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bool")])
@pytest.mark.parametrize("two_pass", [False, True])
def test_sdpa_vector_grid(dtype, D, causal, mask, two_pass):
    _vector_case(dtype, D, causal, mask, two_pass)
    _vector_case(dtype, D, causal, mask, two_pass, H=4, H_kv=1, T=1, S=129, seed=9)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_vector_32768_keys_grid(dtype):
    for two_pass in (False, True):
        _vector_case(dtype, 128, False, None, two_pass, S=32768, T=1, H=4, H_kv=2, blocks=256)

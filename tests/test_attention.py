"""jax_mfa.attention against the float64 reference: forward output, logsumexp
and the gradients for query, key, value and bias (through a random output
cotangent and a nonzero lse cotangent), over a grid of features x dtypes x
fused implementations.

Every feature case runs with every dtype; the cases themselves are chosen so
that each feature (GQA ratios, causal, windows, lengths, bias and mask
broadcast shapes, softcap, odd and unequal T/S, head dims, batch and 3-D
inputs) appears, instead of a full cartesian product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
import reference
from support import (ALL_IMPLEMENTATIONS, FLOAT64_IMPLEMENTATIONS, FUSED, IMPLEMENTATIONS,
                     accumulation_dtype, assert_no_nan, batch_size, check_close, random_array,
                     seq_len, to64)

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64]


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. Sizes are nominal (see conftest.SIZE_PRESETS).

    bias / mask: symbolic shapes over the letters B, N, T, S and 1 (e.g. "B11S",
    "TS"). mask_empty_rows: also clear whole rows of the mask. q_lens/kv_lens:
    per-batch lengths; "T"/"S" mean full, numbers are clipped to the length.
    batch None: 3-D inputs (no batch dim)."""

    name: str
    T: int = 37
    S: int = 37
    N: int = 2
    K: int = 2
    H: int = 32
    batch: int | None = 2
    causal: bool = False
    window: int | tuple[int, int] | None = None
    q_lens: tuple | None = None
    kv_lens: tuple | None = None
    bias: str | None = None
    mask: str | None = None
    mask_empty_rows: bool = False
    softcap: float | None = None
    scale: float | None = None


CASES = [
    Case("basic", T=37, S=37, N=2, K=2, H=64),
    Case("gqa_4_2_causal", T=65, S=65, N=4, K=2, H=32, causal=True),
    Case("mqa_6_1_t_lt_s", T=37, S=130, N=6, K=1, H=16),
    Case("causal_t_lt_s", T=37, S=130, causal=True),
    Case("causal_t_gt_s", T=130, S=37, causal=True, batch=1),
    Case("window_int", T=130, S=130, window=3, batch=1),
    Case("window_causal_left", T=130, S=65, window=(5, 0), causal=True, batch=1),
    Case("window_zero", T=65, S=65, window=0, batch=1),
    Case("window_t_gt_s", T=130, S=37, window=(0, 7), batch=1),
    Case("window_t_lt_s", T=37, S=130, window=(16, 2), N=4, K=2),
    Case("seq_lengths", T=65, S=37, batch=3, q_lens=("T", 0, 17), kv_lens=("S", 5, 0)),
    Case("kv_lengths_only", T=37, S=65, batch=2, kv_lens=(1, "S"), causal=True),
    Case("q_lengths_only", T=130, S=37, batch=2, q_lens=(65, 1)),
    Case("bias_BNTS", T=37, S=65, bias="BNTS"),
    Case("bias_1NTS", T=65, S=37, bias="1NTS", N=4, K=2),
    Case("bias_B11S", T=37, S=130, bias="B11S", causal=True),
    Case("bias_NTS", T=37, S=37, bias="NTS", N=6, K=1),
    Case("bias_TS", T=65, S=65, bias="TS", window=(4, 9)),
    Case("bias_BNT1", T=37, S=65, bias="BNT1"),
    Case("bias_lengths", T=65, S=37, bias="BNTS", batch=3, q_lens=(40, 0, "T"),
         kv_lens=("S", 3, 0)),
    Case("mask_BNTS_empty_rows", T=37, S=65, mask="BNTS", mask_empty_rows=True),
    Case("mask_B11S", T=65, S=37, mask="B11S"),
    Case("mask_TS_empty_rows", T=37, S=37, mask="TS", mask_empty_rows=True, bias="1NTS"),
    Case("mask_1NT1", T=37, S=37, mask="1NT1", N=4, K=1),
    Case("softcap", T=65, S=37, softcap=5.0, bias="BNTS"),
    Case("everything", T=130, S=65, N=4, K=2, batch=3, causal=True, window=(20, 3),
         q_lens=("T", 70, 0), kv_lens=(40, "S", 7), bias="B1TS", mask="BNTS",
         mask_empty_rows=True, softcap=2.0, scale=0.7),
    Case("single_query_key", T=1, S=1),
    Case("decode_t1", T=1, S=130, N=4, K=1, causal=True),
    Case("prefill_t_gt_s_1", T=65, S=1),
    Case("head_dim_1", T=37, S=65, H=1),
    Case("head_dim_7", T=65, S=37, H=7, causal=True),
    Case("head_dim_80", T=37, S=37, H=80, bias="TS"),
    Case("head_dim_128", T=37, S=65, H=128, N=4, K=2),
    Case("head_dim_256", T=65, S=37, H=256, batch=1, window=(9, 9)),
    Case("three_d", T=65, S=37, batch=None, N=4, K=2, bias="NTS", causal=True),
    Case("three_d_lengths", T=37, S=65, batch=None, q_lens=(20,), kv_lens=(30,), mask="TS"),
    Case("custom_scale", T=37, S=37, scale=0.3, bias="B11S"),
]


def _resolve_lens(lens, full, impl_full):
    if lens is None:
        return None
    return np.array([impl_full if v in ("T", "S") else min(v, impl_full) for v in lens],
                    np.int32)


def _shape(symbolic: str, sizes: dict) -> tuple[int, ...]:
    return tuple(1 if c == "1" else sizes[c] for c in symbolic)


def build(case: Case, dtype, impl: str, rng: np.random.Generator):
    """Returns (args, kwargs) for jax_mfa.attention (bias in the accumulation dtype)."""
    T, S = seq_len(impl, case.T), seq_len(impl, case.S)
    B = 1 if case.batch is None else batch_size(impl, case.batch)
    if case.q_lens is not None:
        B = len(case.q_lens) if case.batch is not None else 1
    sizes = dict(B=B, N=case.N, T=T, S=S)
    lead = () if case.batch is None else (B,)
    q = random_array(rng, lead + (T, case.N, case.H), dtype)
    k = random_array(rng, lead + (S, case.K, case.H), dtype)
    v = random_array(rng, lead + (S, case.K, case.H), dtype)
    bias = mask = None
    if case.bias is not None:
        bias = random_array(rng, _shape(case.bias, sizes), accumulation_dtype(dtype), scale=2.0)
    if case.mask is not None:
        mshape = _shape(case.mask, sizes)
        m = rng.random(mshape) < 0.7
        if case.mask_empty_rows and mshape[-2] > 1:
            m[..., ::5, :] = False  # every fifth query row sees no key
        mask = jnp.asarray(m)
    kwargs = dict(scale=case.scale, is_causal=case.causal, local_window_size=case.window,
                  softcap=case.softcap)
    ql = _resolve_lens(case.q_lens, "T", T)
    kl = _resolve_lens(case.kv_lens, "S", S)
    if case.batch is None:
        ql = None if ql is None else jnp.asarray(ql[0])
        kl = None if kl is None else jnp.asarray(kl[0])
    else:
        ql = None if ql is None else jnp.asarray(ql)
        kl = None if kl is None else jnp.asarray(kl)
    kwargs.update(query_seq_lengths=ql, key_value_seq_lengths=kl)
    return (q, k, v, bias, mask), kwargs


def run_jax_mfa(args, kwargs, cotangents, implementation):
    """(out, lse, grads) of jax_mfa.attention; grads for (q, k, v[, bias])."""
    q, k, v, bias, mask = args

    def f(q, k, v, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        return jax_mfa.attention(q, k, v, b, mask, return_residual=True,
                                 implementation=implementation, **kwargs)

    primals = (q, k, v) if bias is None else (q, k, v, bias)
    (out, lse), vjp = jax.vjp(f, *primals)
    grads = vjp(cotangents)
    return out, lse, grads


@functools.partial(jax.jit, static_argnames=("kwargs_items",))
def _reference_vjp(primals, mask, ql, kl, cotangents, kwargs_items):
    kwargs = dict(kwargs_items)

    def f(q, k, v, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        return reference.attention(jnp, q, k, v, b, mask, query_seq_lengths=ql,
                                   key_value_seq_lengths=kl, **kwargs)

    (out, lse), vjp = jax.vjp(f, *primals)
    return out, lse, vjp(cotangents)


def run_reference(args, kwargs, cotangents):
    """Forward with NumPy, gradients with jax.numpy, both float64."""
    q, k, v, bias, mask = args
    kw = dict(kwargs)
    ql, kl = kw.pop("query_seq_lengths"), kw.pop("key_value_seq_lengths")
    np_args = [None if a is None else to64(a) for a in (q, k, v, bias)]
    np_mask = None if mask is None else np.asarray(mask)
    out, lse = reference.attention(
        np, *np_args[:3], np_args[3], np_mask,
        query_seq_lengths=None if ql is None else np.asarray(ql),
        key_value_seq_lengths=None if kl is None else np.asarray(kl), **kw)
    primals = tuple(jnp.asarray(a) for a in np_args if a is not None)
    cts = tuple(jnp.asarray(to64(c)) for c in cotangents)
    window = kw.get("local_window_size")
    if isinstance(window, list):
        kw["local_window_size"] = tuple(window)
    jout, jlse, grads = _reference_vjp(primals, mask, ql, kl, cts, tuple(sorted(kw.items())))
    # The two evaluations of the one reference agree.
    np.testing.assert_allclose(np.asarray(jout), out, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(np.asarray(jlse)), np.isinf(lse))
    return out, lse, grads


def check_empty_rows(out, lse, grads, ref_lse, has_bias_full, bias_grad):
    """Rows with no allowed key: out exactly 0, lse -inf, dq exactly 0."""
    empty = np.isneginf(ref_lse)  # (B, T, N) or (T, N)
    o, l_, dq = to64(out), to64(lse), to64(grads[0])
    assert np.all(o[empty] == 0), "fully masked rows: output not exactly 0"
    assert np.all(np.isneginf(l_[empty])), "fully masked rows: lse not -inf"
    assert np.all(dq[empty] == 0), "fully masked rows: dq not exactly 0"
    if has_bias_full:
        db = to64(bias_grad)  # (B, N, T, S)
        rows = np.transpose(empty, (0, 2, 1)) if empty.ndim == 3 else empty.T
        assert np.all(db[rows] == 0), "fully masked rows: dbias not exactly 0"


def _matrix():
    """(case, impl, dtype): every case on every dtype for the fused kernels; the
    blockwise JAX implementation (compiled per case, a few seconds each on
    the CPU) takes one dtype per case, in turn."""
    params = []
    for index, case in enumerate(CASES):
        for impl in IMPLEMENTATIONS:
            dtypes = [d for d in DTYPES if d != jnp.float64 or impl in FLOAT64_IMPLEMENTATIONS]
            if impl not in FUSED:
                dtypes = [dtypes[index % len(dtypes)]]
            params += [pytest.param(case, impl, d, id=f"{case.name}-{impl}-{jnp.dtype(d).name}")
                       for d in dtypes]
    return params


@pytest.mark.parametrize("case, impl, dtype", _matrix())
def test_against_reference(case, dtype, impl, rng):
    args, kwargs = build(case, dtype, impl, rng)
    q, bias = args[0], args[3]
    B_lse_shape = q.shape[:-1]
    cotangents = (random_array(rng, q.shape, dtype),
                  random_array(rng, B_lse_shape, accumulation_dtype(dtype)))
    out, lse, grads = run_jax_mfa(args, kwargs, cotangents, impl)

    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == B_lse_shape and lse.dtype == accumulation_dtype(dtype)
    for g, a in zip(grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype
    assert_no_nan(out, lse, *grads, what=case.name,
                  names=("out", "lse", "dq", "dk", "dv", "dbias"))

    ref_out, ref_lse, ref_grads = run_reference(args, kwargs, cotangents)
    xla = (None, None, [None] * len(grads))
    if jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
        xla = run_jax_mfa(args, kwargs, cotangents, "xla")

    check_close(out, ref_out, dtype, "out", xla=xla[0], what="out")
    check_close(lse, ref_lse, dtype, "lse", xla=xla[1], what="lse")
    for name, g, r, x in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, xla[2]):
        check_close(g, r, dtype, "dbias" if name == "dbias" else "grad", xla=x, what=name)
    check_empty_rows(out, lse, grads, ref_lse, case.bias == "BNTS",
                     grads[3] if bias is not None else None)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_element_written(impl, rng):
    """XLA allocates the outputs, so unwritten elements cannot be poisoned
    directly: dirty the allocator with a large computation first, then check
    every element of odd-sized results, including fully masked rows and keys
    beyond the valid lengths, which must be exactly 0."""
    junk = jnp.full((1 << 20,), jnp.nan, jnp.float32) * 3.0
    junk.block_until_ready()
    del junk
    T, S = seq_len(impl, 130), seq_len(impl, 37)
    q = random_array(rng, (3, T, 3, 7), jnp.float32)
    k = random_array(rng, (3, S, 1, 7), jnp.float32)
    v = random_array(rng, (3, S, 1, 7), jnp.float32)
    ql = jnp.asarray([T, 0, 11], jnp.int32)
    kl = jnp.asarray([S, 9, 0], jnp.int32)
    bias = random_array(rng, (3, 3, T, S), jnp.float32)

    def f(q, k, v, bias):
        return jax_mfa.attention(q, k, v, bias, query_seq_lengths=ql, key_value_seq_lengths=kl,
                                 return_residual=True, implementation=impl)

    (out, lse), vjp = jax.vjp(f, q, k, v, bias)
    dq, dk, dv, dbias = vjp((random_array(rng, q.shape, jnp.float32),
                             random_array(rng, lse.shape, jnp.float32)))
    out, lse, dq, dk, dv, dbias = (to64(x) for x in (out, lse, dq, dk, dv, dbias))
    for name, x in dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dbias=dbias).items():
        assert not np.isnan(x).any(), name
    # batch 1: nothing is valid; batch 2: no key is valid.
    for b in (1, 2):
        assert np.all(out[b] == 0) and np.all(np.isneginf(lse[b]))
        assert np.all(dq[b] == 0) and np.all(dk[b] == 0) and np.all(dv[b] == 0)
        assert np.all(dbias[b] == 0)
    # batch 0: full; every row written and finite.
    assert np.isfinite(lse[0]).all() and np.isfinite(out[0]).all()
    ref_out, ref_lse = reference.attention(np, to64(q), to64(k), to64(v), to64(bias),
                                           query_seq_lengths=np.asarray(ql),
                                           key_value_seq_lengths=np.asarray(kl))
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_no_allowed_key_anywhere(impl, rng):
    """An all-False mask: every output 0, every lse -inf, every gradient 0."""
    T, S = seq_len(impl, 65), seq_len(impl, 37)
    q = random_array(rng, (2, T, 2, 16), jnp.float32)
    k = random_array(rng, (2, S, 2, 16), jnp.float32)
    v = random_array(rng, (2, S, 2, 16), jnp.float32)
    bias = random_array(rng, (2, 1, T, S), jnp.float32)
    mask = jnp.zeros((T, S), bool)

    def f(q, k, v, bias):
        return jax_mfa.attention(q, k, v, bias, mask, return_residual=True,
                                 implementation=impl)

    (out, lse), vjp = jax.vjp(f, q, k, v, bias)
    grads = vjp((jnp.ones_like(out), jnp.ones_like(lse)))
    assert np.all(to64(out) == 0) and np.all(np.isneginf(to64(lse)))
    for g in grads:
        assert np.all(to64(g) == 0)


EXTREME_OPTIONS = [dict(softcap=float(np.finfo(np.float32).tiny)), dict(softcap=1e31),
                   dict(scale=0.0), dict(scale=-0.7, softcap=3.0), dict(scale=1e-30),
                   dict(scale=1e30, softcap=2.0), dict(scale=1e25), dict(scale=-1e25)]
# (Logits beyond 1e30 in magnitude are out of scope: the Metal kernels use a
# finite -1e30 as their masked-logit sentinel, see metal/attention_kernels.h.)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_extreme_options_agree(impl, rng):
    """Every implementation computes the reference's result for the edges of
    the accepted scale and softcap ranges (float32 inputs)."""
    q = random_array(rng, (2, 13, 2, 8), jnp.float32)
    k = random_array(rng, (2, 11, 2, 8), jnp.float32)
    v = random_array(rng, (2, 11, 2, 8), jnp.float32)
    for opts in EXTREME_OPTIONS:
        out, lse = jax_mfa.attention(q, k, v, is_causal=True, return_residual=True,
                                     implementation=impl, **opts)
        ref_out, ref_lse = reference.attention(np, to64(q), to64(k), to64(v), is_causal=True,
                                               **opts)
        check_close(out, ref_out, jnp.float32, "out", what=f"{opts} out")
        scale = max(1.0, float(np.max(np.abs(ref_lse))))
        assert np.max(np.abs(to64(lse) - ref_lse)) <= 1e-5 * scale, opts

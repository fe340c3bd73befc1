"""Packed sequences (segment ids), attention sinks and dropout on every
implementation, against the float64 reference (tests/reference.py), alone and
combined with every other feature; the dropout generator against Random123's
published Philox4x32-10 vectors and across implementations; dropout
statistics; tile skipping; vmap; bad input.

The reference applies the dropout mask of an independent NumPy Philox (below),
so a kernel that drew a different mask fails the comparison.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_mfa
import reference
from jax_mfa._benchmark import median_times
from support import (FLOAT64_IMPLEMENTATIONS, FUSED, IMPLEMENTATIONS, accumulation_dtype,
                     assert_nan_pattern_and_close, assert_no_nan, batch_size, check_close,
                     dtype_for, random_array, relative_error, run_with_host_devices,
                     same_impl_tolerance, seq_len, to64)

ALL_IMPLEMENTATIONS = IMPLEMENTATIONS + ["xla"]
FLOAT64_ALL = FLOAT64_IMPLEMENTATIONS + ["xla"]

# --- the generator: an independent NumPy Philox4x32-10 -------------------------

# Random123's known-answer vectors (its tests/kat_vectors): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def numpy_philox(counter, key):
    """Philox4x32-10 in uint64 arithmetic (written from the paper's definition)."""
    mask = np.uint64(0xFFFFFFFF)
    x, y, z, w = (np.asarray(c, np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, np.uint64) for k in key)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * x
        p1 = np.uint64(0xCD9E8D57) * z
        x, y, z, w = ((p1 >> np.uint64(32)) ^ y ^ k0, p1 & mask,
                      (p0 >> np.uint64(32)) ^ w ^ k1, p0 & mask)
        k0 = (k0 + np.uint64(0x9E3779B9)) & mask
        k1 = (k1 + np.uint64(0xBB67AE85)) & mask
    return x, y, z, w


def reference_keep(rng_key, rate, B, N, T, S, *, broadcast=False):
    """The documented keep mask (B, N, T, S): Philox keyed by the key's two data
    words, counter (j // 4, i, n, b), word j % 4, kept iff >= round(rate 2^32)."""
    k0, k1 = (int(w) for w in np.asarray(jax.random.key_data(rng_key)).reshape(-1)[:2])
    index = (lambda n: np.zeros(n, int)) if broadcast else np.arange
    b, n, i, j = np.meshgrid(index(B), index(N), np.arange(T), np.arange(S), indexing="ij")
    words = numpy_philox((j // 4, i, n, b), (k0, k1))
    word = np.choose(j % 4, words)
    return word >= min(round(rate * 2.0**32), 2**32 - 1)


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    """NumPy, JAX (jax_mfa._philox) and the C++/MSL header as compiled into the
    extension all give Random123's published outputs."""
    from jax_mfa import _native, _philox

    assert tuple(int(v) for v in numpy_philox(counter, key)) == expected
    got = _philox.philox4x32_10([np.uint32(c) for c in counter], [np.uint32(k) for k in key])
    assert tuple(int(v) for v in got) == expected
    ext = _native.extension()
    if ext is None:
        pytest.skip("native extension not built")
    assert tuple(ext.philox4x32_10(*counter, *key)) == expected


def test_philox_implementations_agree(rng):
    """JAX and C++ agree with the NumPy Philox on random counters and keys."""
    from jax_mfa import _native, _philox

    ctr = rng.integers(0, 2**32, (4, 64), dtype=np.uint64)
    key = rng.integers(0, 2**32, 2, dtype=np.uint64)
    ref = np.stack(numpy_philox(ctr, key))
    got = np.stack(_philox.philox4x32_10(ctr.astype(np.uint32), key.astype(np.uint32)))
    np.testing.assert_array_equal(np.asarray(got, np.uint64), ref)
    ext = _native.extension()
    if ext is not None:
        for c in range(8):
            assert tuple(ext.philox4x32_10(*(int(v) for v in ctr[:, c]), *(int(k) for k in key))) \
                == tuple(int(v) for v in ref[:, c])


def test_keep_fraction():
    """The generator keeps 1 - rate of the entries (binomial 5-sigma bounds)."""
    key = jax.random.key(7)
    for rate in (0.1, 0.5, 0.9):
        keep = reference_keep(key, rate, 2, 4, 64, 128)
        n = keep.size
        sigma = np.sqrt(n * rate * (1 - rate))
        assert abs(keep.sum() - n * (1 - rate)) < 5 * sigma, rate


# --- the comparison matrix ----------------------------------------------------

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.float64]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    T: int = 37
    S: int = 37
    N: int = 2
    K: int = 2
    H: int = 16
    batch: int | None = 2
    segments: str | None = None  # "sorted" (packed) or "random"
    sinks: bool = False
    dropout: float = 0.0
    causal: bool = False
    window: tuple | None = None
    lengths: bool = False
    bias: bool = False
    mask: bool = False
    softcap: float | None = None


CASES = [
    Case("sinks", T=37, S=65, N=4, K=2, sinks=True),
    Case("sinks_empty_rows", T=65, S=37, sinks=True, lengths=True, mask=True),
    Case("segments_packed", T=65, S=65, segments="sorted"),
    Case("segments_random", T=37, S=65, N=4, K=1, segments="random"),
    Case("segments_causal_window_bias", T=130, S=130, segments="sorted", causal=True,
         window=(20, 3), bias=True, batch=1),
    Case("dropout", T=65, S=37, dropout=0.3),
    Case("dropout_gqa_causal_softcap", T=65, S=65, N=4, K=2, dropout=0.5, causal=True,
         softcap=3.0, bias=True),
    Case("everything", T=130, S=65, N=4, K=2, segments="sorted", sinks=True, dropout=0.25,
         causal=True, window=(40, 9), lengths=True, bias=True, mask=True, softcap=4.0),
    Case("everything_random_ids", T=65, S=130, N=2, K=1, segments="random", sinks=True,
         dropout=0.4, lengths=True, bias=True),
    Case("three_d", T=37, S=65, N=4, K=2, batch=None, segments="sorted", sinks=True,
         dropout=0.2),
    # Decoding: the CPU kernels also split the keys and merge the slices.
    Case("decode_split_keys", T=1, S=1100, N=4, K=1, batch=1, segments="random", sinks=True,
         dropout=0.3, lengths=True),
]


def _ids(rng, B, L, kind, parts=4):
    if kind == "sorted":
        return np.sort(rng.integers(0, parts, (B, L)), axis=1).astype(np.int32)
    return rng.integers(0, 3, (B, L)).astype(np.int32)


def build(case: Case, dtype, impl, rng):
    """(primals, static kwargs, reference kwargs) for one case."""
    T, S = seq_len(impl, case.T), seq_len(impl, case.S)
    B = 1 if case.batch is None else batch_size(impl, case.batch)
    lead = () if case.batch is None else (B,)
    acc = accumulation_dtype(dtype)
    q = random_array(rng, lead + (T, case.N, case.H), dtype)
    k = random_array(rng, lead + (S, case.K, case.H), dtype)
    v = random_array(rng, lead + (S, case.K, case.H), dtype)
    primals = dict(q=q, k=k, v=v)
    kw = dict(is_causal=case.causal, local_window_size=case.window, softcap=case.softcap)
    ref_kw = {}
    if case.bias:
        primals["bias"] = random_array(rng, lead + (case.N, T, S), acc, scale=2.0)
    if case.sinks:
        primals["sinks"] = random_array(rng, (case.N,), acc, scale=2.0)
    if case.mask:
        m = rng.random(lead + (1, T, S)) < 0.8
        m[..., ::7, :] = False  # rows with no allowed key
        kw["mask"] = jnp.asarray(m)
    if case.lengths:
        ql = np.array([T, max(1, T // 3)][:B], np.int32)
        kl = np.array([max(1, S // 2), S][:B], np.int32)
        kw["query_seq_lengths"] = jnp.asarray(ql if lead else ql[0])
        kw["key_value_seq_lengths"] = jnp.asarray(kl if lead else kl[0])
    if case.segments:
        qs, ks = _ids(rng, B, T, case.segments), _ids(rng, B, S, case.segments)
        kw["query_segment_ids"] = jnp.asarray(qs if lead else qs[0])
        kw["key_value_segment_ids"] = jnp.asarray(ks if lead else ks[0])
    if case.dropout:
        key = jax.random.key(int(rng.integers(0, 2**31)))
        kw.update(dropout_rate=case.dropout, dropout_rng=key)
        keep = reference_keep(key, case.dropout, B, case.N, T, S)
        ref_kw.update(dropout_keep=keep if lead else keep[0], dropout_rate=case.dropout)
    return primals, kw, ref_kw


def run(primals, kw, cotangents, implementation):
    names = list(primals)

    def f(*args):
        a = dict(zip(names, args))
        return jax_mfa.attention(a["q"], a["k"], a["v"], a.get("bias"), kw.get("mask"),
                                 sinks=a.get("sinks"), return_residual=True,
                                 implementation=implementation,
                                 **{n: x for n, x in kw.items() if n != "mask"})

    (out, lse), vjp = jax.vjp(f, *primals.values())
    return out, lse, dict(zip(names, vjp(cotangents)))


def run_reference(primals, kw, ref_kw, cotangents):
    """float64 forward (NumPy) and gradients (jax.numpy) of the reference."""
    names = list(primals)
    mask = kw.get("mask")
    kw = {n: (np.asarray(x) if isinstance(x, jax.Array) else x) for n, x in kw.items()
          if n not in ("mask", "dropout_rate", "dropout_rng")}
    window = kw.get("local_window_size")

    def call(xp, args):
        a = dict(zip(names, args))
        return reference.attention(xp, a["q"], a["k"], a["v"], a.get("bias"),
                                   None if mask is None else np.asarray(mask),
                                   sinks=a.get("sinks"), **kw, **ref_kw)

    args64 = [to64(x) for x in primals.values()]
    out, lse = call(np, args64)
    kw["local_window_size"] = window
    (jout, _), vjp = jax.vjp(lambda *a: call(jnp, a), *(jnp.asarray(a) for a in args64))
    np.testing.assert_allclose(np.asarray(jout), out, rtol=1e-12, atol=1e-12)
    grads = vjp(tuple(jnp.asarray(to64(c)) for c in cotangents))
    return out, lse, dict(zip(names, grads))


def _matrix():
    """(case, impl, dtype) triples. By default every case runs in float32 on
    every implementation and float64 where available; float16/bfloat16 run for
    the combined cases. The rest is marked slow (pytest -m slow)."""
    full = {"everything", "everything_random_ids"}
    for case in CASES:
        for impl in ALL_IMPLEMENTATIONS:
            for dtype in DTYPES:
                if dtype == jnp.float64 and impl not in FLOAT64_ALL:
                    continue
                if impl == "xla" and dtype in (jnp.float16, jnp.bfloat16):
                    continue  # the half-precision yardstick itself
                default = dtype in (jnp.float32, jnp.float64) or case.name in full
                if impl == "metal-emulated" and dtype == jnp.float16 and case.name != "everything":
                    default = False  # the emulator is slow; bfloat16 covers 16-bit there
                if impl == "xla" and dtype == jnp.float32:
                    default = False  # float64 checks the comparison path more tightly
                marks = () if default else (pytest.mark.slow,)
                yield pytest.param(case, impl, dtype, marks=marks,
                                   id=f"{case.name}-{impl}-{jnp.dtype(dtype).name}")


@pytest.mark.parametrize("case, impl, dtype", list(_matrix()))
def test_against_reference(case, dtype, impl, rng):
    primals, kw, ref_kw = build(case, dtype, impl, rng)
    q = primals["q"]
    cotangents = (random_array(rng, q.shape, dtype),
                  random_array(rng, q.shape[:-1], accumulation_dtype(dtype)))
    out, lse, grads = run(primals, kw, cotangents, impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, g in grads.items():
        assert g.shape == primals[name].shape and g.dtype == primals[name].dtype, name
    assert_no_nan(out, lse, *grads.values(), what=case.name,
                  names=["out", "lse", *("d" + n for n in grads)])

    ref_out, ref_lse, ref_grads = run_reference(primals, kw, ref_kw, cotangents)
    xla = (None, None, dict.fromkeys(grads))
    if jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
        xla = run(primals, kw, cotangents, "xla")
    check_close(out, ref_out, dtype, "out", xla=xla[0], what="out")
    check_close(lse, ref_lse, dtype, "lse", xla=xla[1], what="lse")
    for name, g in grads.items():
        kind = "dbias" if name in ("bias", "sinks") else "grad"
        check_close(g, ref_grads[name], dtype, kind, xla=xla[2][name], what="d" + name)
    if case.sinks:  # a row with no allowed key: output 0 and lse = its sink
        empty = np.isclose(to64(ref_lse), np.broadcast_to(to64(primals["sinks"]), ref_lse.shape),
                           rtol=0, atol=0) & np.all(ref_out == 0, axis=-1)
        assert empty.any() or not case.mask  # the masked cases have such rows
        assert np.all(to64(out)[empty] == 0)


@pytest.mark.parametrize("impl", FLOAT64_ALL)
def test_check_grads_float64(impl, rng):
    """Numerical gradients (float64, fixed dropout key) of q, k, v, bias and sinks."""
    B, T, S, N, K, H = 2, 13, 11, 4, 2, 5
    q, k, v = (random_array(rng, s, jnp.float64) for s in
               ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    bias = random_array(rng, (B, N, T, S), jnp.float64)
    sinks = random_array(rng, (N,), jnp.float64)
    qs = jnp.asarray(_ids(rng, B, T, "sorted", 2))
    ks = jnp.asarray(_ids(rng, B, S, "sorted", 2))
    key = jax.random.key(11)

    def f(q, k, v, bias, sinks):
        out, lse = jax_mfa.attention(q, k, v, bias, is_causal=True, sinks=sinks,
                                     query_segment_ids=qs, key_value_segment_ids=ks,
                                     dropout_rate=0.3, dropout_rng=key, return_residual=True,
                                     implementation=impl)
        return out, jnp.where(jnp.isfinite(lse), lse, 0)

    check_grads(f, (q, k, v, bias, sinks), order=1, modes=["rev"], eps=1e-6,
                atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_same_mask_everywhere(impl, rng):
    """Same key: the fused implementation gives the xla result (to rounding);
    same key again: identical; another key: different."""
    B, T, S, N, K, H = 2, seq_len(impl, 65), seq_len(impl, 37), 4, 2, 16
    dtype = jnp.float32
    q, k, v = (random_array(rng, s, dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))

    def f(key, implementation):
        return jax_mfa.attention(q, k, v, dropout_rate=0.5, dropout_rng=key, is_causal=True,
                                 implementation=implementation)

    a = f(jax.random.key(1), impl)
    np.testing.assert_allclose(to64(a), to64(f(jax.random.key(1), "xla")), atol=1e-5)
    np.testing.assert_array_equal(to64(a), to64(f(jax.random.key(1), impl)))
    assert np.abs(to64(a) - to64(f(jax.random.key(2), impl))).max() > 0.1


@pytest.mark.parametrize("impl", [i for i in ALL_IMPLEMENTATIONS if i != "metal-emulated"])
def test_dropout_mean_over_keys(impl, rng):
    """Averaged over many keys, the output with dropout approaches the output
    without it (dropout is unbiased): the mean's error shrinks like 1/sqrt(n)."""
    B, T, S, N, H = 1, 8, 24, 2, 8
    q, k, v = (random_array(rng, s, jnp.float32) for s in ((B, T, N, H), (B, S, N, H),
                                                           (B, S, N, H)))
    plain = to64(jax_mfa.attention(q, k, v, implementation=impl))
    keys = jax.random.split(jax.random.key(3), 400)
    outs = jax.vmap(lambda key: jax_mfa.attention(q, k, v, dropout_rate=0.4, dropout_rng=key,
                                                  implementation=impl))(keys)
    outs = to64(outs)
    spread = outs.std(axis=0) / np.sqrt(len(keys))
    assert np.all(np.abs(outs.mean(axis=0) - plain) <= 5 * spread + 1e-6)
    assert np.abs(outs[0] - plain).max() > 1e-2  # it did drop something


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmap_over_new_arguments(impl, rng):
    """vmap over segment ids, sinks and the dropout key equals a loop. (Not on
    "xla": plain jax.numpy, which JAX batches itself; the argument handling
    it shares is covered here, and its compile was this file's slowest test.)"""
    V, B, T, S, N, K, H = 2, 2, seq_len(impl, 17), seq_len(impl, 37), 4, 2, 8
    dtype = jnp.float64 if impl in FLOAT64_ALL else jnp.float32
    q = random_array(rng, (B, T, N, H), dtype)
    k = random_array(rng, (B, S, K, H), dtype)
    v = random_array(rng, (B, S, K, H), dtype)
    qs = jnp.asarray(np.stack([_ids(rng, B, T, "sorted") for _ in range(V)]))
    ks = jnp.asarray(np.stack([_ids(rng, B, S, "sorted") for _ in range(V)]))
    sinks = random_array(rng, (V, N), accumulation_dtype(dtype))
    keys = jax.random.split(jax.random.key(5), V)

    def f(qs, ks, sinks, key, q):
        out, lse = jax_mfa.attention(q, k, v, query_segment_ids=qs, key_value_segment_ids=ks,
                                     sinks=sinks, dropout_rate=0.3, dropout_rng=key,
                                     return_residual=True, implementation=impl)
        return jnp.sum(out * out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    g = jax.vmap(jax.value_and_grad(f, argnums=(2, 4)), in_axes=(0, 0, 0, 0, None))
    (vals, (dsinks, dq)) = g(qs, ks, sinks, keys, q)
    tol = same_impl_tolerance(impl)
    for i in range(V):
        val, (ds, d) = jax.value_and_grad(f, argnums=(2, 4))(qs[i], ks[i], sinks[i], keys[i], q)
        np.testing.assert_allclose(to64(vals[i]), to64(val), rtol=tol * 10)
        np.testing.assert_allclose(to64(dsinks[i]), to64(ds), rtol=tol * 10, atol=tol)
        np.testing.assert_allclose(to64(dq[i]), to64(d), rtol=tol * 10, atol=tol)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_broadcast_dropout(impl, rng):
    """The Flax adapter's broadcast_dropout: one mask for every batch row and head."""
    B, T, S, N, H = 2, 9, seq_len(impl, 37), 3, 8
    q = random_array(rng, (B, T, N, H), jnp.float32)
    k = random_array(rng, (B, S, 1, H), jnp.float32)
    v = jnp.asarray(np.broadcast_to(np.eye(S, H, dtype=np.float32)[None, :, None, :],
                                    (B, S, 1, H)))
    key = jax.random.key(9)
    out = to64(jax_mfa.attention(q, k, v, dropout_rate=0.5, dropout_rng=key,
                                 implementation=impl, _dropout_broadcast=True))
    keep = reference_keep(key, 0.5, B, N, T, S, broadcast=True)
    ref, _ = reference.attention(np, to64(q), to64(k), to64(v), dropout_keep=keep,
                                 dropout_rate=0.5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def _packed_inputs(rng, seqs, length, N, H):
    T = seqs * length
    q, k, v = (random_array(rng, (1, T, N, H), jnp.float32) for _ in range(3))
    ids = jnp.asarray(np.repeat(np.arange(seqs, dtype=np.int32), length)[None])
    return q, k, v, ids


def _fastest_times(calls, rounds: int):
    """The least time each call took over `rounds` interleaved rounds (each
    round first runs every call once untimed, then times each once): load from
    other processes can only add time, so the minimum is the robust figure."""
    return np.min([median_times(calls, repeats=1, warmup=0, min_time=0)
                   for _ in range(rounds)], axis=0)


@pytest.mark.parametrize("impl", [
    pytest.param(i, marks=(pytest.mark.slow,) if i == "metal-emulated" else ())
    for i in FUSED if i in ("cpu", "metal-emulated")])
def test_packed_batch_skips_tiles(impl, rng):
    """64 packed sequences of 64 tokens cost at most 2x 64 single sequences:
    tiles whose segments cannot meet are skipped (4096² unskipped would be 64x).
    The emulator runs one head (about a second per call; it measures 1.5-1.7x)."""
    N, H = (1, 64) if impl == "metal-emulated" else (4, 64)
    q, k, v, ids = _packed_inputs(rng, 64, 64, N, H)
    packed = jax.jit(lambda q, k, v: jax_mfa.attention(
        q, k, v, query_segment_ids=ids, key_value_segment_ids=ids, is_causal=True,
        implementation=impl))
    single = jax.jit(lambda q, k, v: jax_mfa.attention(q, k, v, is_causal=True,
                                                       implementation=impl))
    qs, ks, vs = (x[:, :64] for x in (q, k, v))

    def single64(q, k, v):
        return [single(q, k, v) for _ in range(64)]

    t_packed, t_single64 = _fastest_times([(packed, (q, k, v)), (single64, (qs, ks, vs))],
                                          rounds=5 if impl == "cpu" else 3)
    assert t_packed <= 2 * t_single64, (t_packed, t_single64)
    # And the result is the per-sequence attention.
    out = to64(packed(q, k, v))
    np.testing.assert_allclose(out[:, 64:128], to64(single(*(x[:, 64:128] for x in (q, k, v)))),
                               atol=1e-5)


def _consecutive_ids(rng, length, segments):
    """Sorted ids 0..segments-1, every one present (random segment lengths)."""
    cuts = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False))
    return np.repeat(np.arange(segments, dtype=np.int32), np.diff(cuts, prepend=0,
                                                                  append=length))


@pytest.mark.skipif("xla-blockwise" not in ALL_IMPLEMENTATIONS, reason="not tested here")
def test_blockwise_skips_invisible_key_blocks(rng, monkeypatch):
    """xla-blockwise computes the logits of exactly the (query block, key block)
    pairs that hold an allowed entry, forward and backward, when ids are
    consecutive and lengths are block multiples (causal bounds the loop; segment
    ids and lengths skip through lax.cond; a skipped block holds no allowed
    entry, so the results are unchanged). Counted with a debug callback in each
    computed block."""
    from jax_mfa import _blockwise

    visits = []
    logits = _blockwise._logits

    def counting_logits(*args, **kwargs):
        jax.debug.callback(lambda: visits.append(1))
        return logits(*args, **kwargs)

    compiled = (_blockwise._forward_compiled, _blockwise._backward_compiled)
    monkeypatch.setattr(_blockwise, "_logits", counting_logits)
    monkeypatch.setattr(_blockwise, "QUERY_BLOCK", 32)
    monkeypatch.setattr(_blockwise, "KEY_BLOCK", 32)
    for f in compiled:  # retrace with the counting logits and these blocks
        f.clear_cache()
    try:
        B, L, N, H, blk = 2, 256, 2, 8, 32
        q, k, v = (random_array(rng, (B, L, N, H), jnp.float32) for _ in range(3))
        ids = np.stack([np.repeat(np.arange(8, dtype=np.int32), 32),  # block-aligned
                        _consecutive_ids(rng, L, 11)])
        ql, kl = np.array([L, 160], np.int32), np.array([192, L], np.int32)
        kw = dict(query_segment_ids=jnp.asarray(ids), key_value_segment_ids=jnp.asarray(ids),
                  query_seq_lengths=jnp.asarray(ql), key_value_seq_lengths=jnp.asarray(kl),
                  is_causal=True)
        i, j = np.arange(L)[:, None], np.arange(L)[None, :]
        allowed = ((j <= i) & (i < ql[:, None, None]) & (j < kl[:, None, None])
                   & (ids[:, :, None] == ids[:, None, :]))  # (B, T, S)
        expected = int(allowed.reshape(B, L // blk, blk, L // blk, blk).any(axis=(0, 2, 4)).sum())
        assert expected < (L // blk) * (L // blk + 1) // 2  # fewer than causal alone

        f = lambda q, k, v: jax_mfa.attention(q, k, v, implementation="xla-blockwise", **kw)  # noqa
        out, vjp = jax.vjp(f, q, k, v)
        jax.block_until_ready(out)
        assert len(visits) == expected
        visits.clear()
        jax.block_until_ready(vjp(out))
        assert len(visits) == expected  # (the results: test_against_reference)
    finally:
        for f in compiled:  # drop the traces that count
            f.clear_cache()


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_nan_with_features(impl, rng):
    """NaN with segment ids, sinks and dropout: a NaN key element makes NaN
    (out and lse) exactly the rows of its segment and heads, also where dropout
    drops it (the normaliser is taken before dropout), and is invisible to the
    other segments; a NaN query element makes its row NaN despite the sink."""
    dtype = dtype_for(impl)
    B, T, S, N, K, H = 2, 19, 23, 4, 2, 8
    q = random_array(rng, (B, T, N, H), dtype).at[1, 3, 0, 2].set(np.nan)
    k = random_array(rng, (B, S, K, H), dtype).at[0, 5, 1, 0].set(np.nan)
    v = random_array(rng, (B, S, K, H), dtype)
    sinks = random_array(rng, (N,), accumulation_dtype(dtype))
    qs = np.repeat([[0, 1]], [10, T - 10], axis=1).repeat(B, axis=0).astype(np.int32)
    ks = np.repeat([[0, 1]], [12, S - 12], axis=1).repeat(B, axis=0).astype(np.int32)
    key = jax.random.key(17)
    out, lse = jax_mfa.attention(q, k, v, sinks=sinks, query_segment_ids=jnp.asarray(qs),
                                 key_value_segment_ids=jnp.asarray(ks), dropout_rate=0.5,
                                 dropout_rng=key, return_residual=True, implementation=impl)
    keep = reference_keep(key, 0.5, B, N, T, S)
    assert not keep[0, 2:4, :10, 5].all()  # some rows of the NaN key drop it
    want = reference.attention(np, to64(q), to64(k), to64(v), sinks=to64(sinks),
                               query_segment_ids=qs, key_value_segment_ids=ks,
                               dropout_keep=keep, dropout_rate=0.5)
    assert np.isnan(to64(lse)[0, :10, 2:4]).all() and np.isfinite(to64(lse)[0, 10:]).all()
    assert np.isnan(to64(out)[1, 3, 0]).all() and np.isfinite(to64(out)[1, 4:]).all()
    tol = 1e-10 if dtype == jnp.float64 else 2e-5
    assert_nan_pattern_and_close(out, want[0], tol, "out")
    assert_nan_pattern_and_close(lse, want[1], tol, "lse")


# --- bad input ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(query_segment_ids=np.zeros((2, 5), np.int32)), ValueError, "both or neither"),
    (dict(key_value_segment_ids=np.zeros((2, 6), np.int32)), ValueError, "both or neither"),
    (dict(query_segment_ids=np.zeros((2, 4), np.int32),
          key_value_segment_ids=np.zeros((2, 6), np.int32)), ValueError, "query_segment_ids"),
    (dict(query_segment_ids=np.zeros((2, 5), np.int32),
          key_value_segment_ids=np.zeros((2, 7), np.int32)), ValueError,
     "key_value_segment_ids"),
    (dict(query_segment_ids=np.zeros((2, 5), np.float32),
          key_value_segment_ids=np.zeros((2, 6), np.float32)), TypeError, "integer"),
    (dict(sinks=np.zeros((3,), np.float32)), ValueError, "sinks must have shape"),
    (dict(sinks=np.zeros((4,), np.int32)), TypeError, "sinks must be a floating"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), ValueError, r"\[0, 1\)"),
    (dict(dropout_rate=-0.1, dropout_rng=jax.random.key(0)), ValueError, r"\[0, 1\)"),
    (dict(dropout_rate=0.1), ValueError, "dropout_rng"),
    (dict(dropout_rate=0.1, dropout_rng=np.zeros(3, np.float32)), TypeError, "PRNG key"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.split(jax.random.key(0), 2)), ValueError,
     "single key"),
])
@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_bad_input_raises(impl, kwargs, error, match):
    q = jnp.zeros((2, 5, 4, 8), jnp.float32)
    kv = jnp.zeros((2, 6, 2, 8), jnp.float32)
    with pytest.raises(error, match=match):
        jax_mfa.attention(q, kv, kv, implementation=impl, **kwargs)


def test_traced_rate_raises():
    q = jnp.zeros((1, 5, 2, 8), jnp.float32)
    with pytest.raises(TypeError, match="dropout_rate must be a static"):
        jax.jit(lambda r: jax_mfa.attention(q, q, q, dropout_rate=r,
                                            dropout_rng=jax.random.key(0)))(0.1)


# --- sharded inputs -------------------------------------------------------------

SHARDING_SCRIPT = """
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_mfa

assert len(jax.devices()) == 4, jax.devices()
mesh = jax.make_mesh((4,), ("b",))
rng = np.random.default_rng(0)
B, T, S, N, K, H = 8, {T}, {S}, 4, 2, 16
q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
k = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
v = jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32)
qs = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
ks = jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), axis=1), jnp.int32)
sinks = jnp.asarray(rng.standard_normal(N), jnp.float32)
w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
key = jax.random.key(4)

def loss(q, k, v, sinks, qs, ks):
    out = jax_mfa.attention(q, k, v, query_segment_ids=qs, key_value_segment_ids=ks,
                            sinks=sinks, dropout_rate={rate}, dropout_rng=key, is_causal=True,
                            implementation={impl!r})
    return jnp.sum(out * w)

grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
want = grad(q, k, v, sinks, qs, ks)
sh = NamedSharding(mesh, {spec})
ids = NamedSharding(mesh, P(*{spec}[:2]))
kv_sh = NamedSharding(mesh, {kv_spec})
args = [jax.device_put(q, sh)] + [jax.device_put(x, kv_sh) for x in (k, v)] + [sinks] + [
    jax.device_put(x, ids) for x in (qs, ks)]
got = jax.jit(grad)(*args)
for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, e = np.asarray(g), np.asarray(e)
    assert np.max(np.abs(g - e)) <= 1e-5 * np.max(np.abs(e)), np.max(np.abs(g - e))
print("SHARDING OK")
"""


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sharded_batch(impl):
    """Batch-sharded inputs: every shard draws its rows' dropout masks (the
    seed operand carries the batch index) and the sinks gradient is summed
    over all shards."""
    script = SHARDING_SCRIPT.format(impl=impl, T=37, S=45, rate=0.3, spec='P("b")',
                                    kv_spec='P("b")')
    assert "SHARDING OK" in run_with_host_devices(script)


@pytest.mark.parametrize("spec, kv_spec, rate", [
    # heads (K = 2 key/value heads stay replicated): sinks sharded with the
    # query heads, every device draws its heads' dropout mask
    ('P(None, None, "b")', "P()", 0.0),
    ('P(None, None, "b")', "P()", 0.3),
    # sequence: the ring carries segment ids, sinks join the final merge, every
    # block draws from its absolute rows (T = 36, S = 44: odd chunks)
    ('P(None, "b")', 'P(None, "b")', 0.3),
])
def test_sharded_heads_and_sequence(spec, kv_spec, rate):
    """Head- and sequence-sharded inputs with segment ids, sinks and dropout
    give the unsharded results (the ROLES of the new operands; the seed's
    counter origin follows the heads and the ring's blocks)."""
    script = SHARDING_SCRIPT.format(impl="cpu", T=36, S=44, rate=rate, spec=spec,
                                    kv_spec=kv_spec)
    assert "SHARDING OK" in run_with_host_devices(script)


@pytest.mark.parametrize("impl", ALL_IMPLEMENTATIONS)
def test_counter_origin(impl, rng):
    """A kernel call on a part of the problem (a device's heads, a ring
    block's queries and keys) draws that part of the whole problem's mask: the
    seed's origin (head, query, key) shifts the counter. Odd origins, so that
    key pairs straddle Philox's groups of four; GQA; forward and gradients
    against the float64 reference with the independently drawn mask, cut out
    of the whole problem's."""
    from jax_mfa import _api, _philox

    B, T, S, N, K, H = 2, seq_len(impl, 13), seq_len(impl, 19), 4, 2, 16
    head0, query0, key0 = 3, 2 * int(rng.integers(0, 50)) + 1, 2 * int(rng.integers(0, 50)) + 1
    rate, key = 0.4, jax.random.key(int(rng.integers(0, 2**31)))
    dtype = jnp.float64 if impl in FLOAT64_ALL else jnp.float32
    q, k, v = (random_array(rng, s, dtype) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    _, _, ops, options, _ = _api._setup(
        q, k, v, None, None, None, None, scale=None, is_causal=True, local_window_size=None,
        softcap=None, implementation=impl, dropout_rate=rate, dropout_rng=key)
    seed = _philox.shift_origin(ops.dropout_seed, head=head0, query=query0, key=key0)

    @jax.jit
    def f(q, k, v, seed):
        part = dataclasses.replace(ops, query=q, key=k, value=v, dropout_seed=seed)
        return _api.call_implementation(impl, part, options)

    cotangents = (random_array(rng, q.shape, dtype),
                  random_array(rng, q.shape[:-1], accumulation_dtype(dtype)))
    (out, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v, seed), q, k, v)
    grads = dict(zip("qkv", vjp(cotangents)))
    whole = reference_keep(key, rate, B, head0 + N, query0 + T, key0 + S)
    ref_kw = dict(dropout_keep=whole[:, head0:, query0:, key0:], dropout_rate=rate)
    ref_out, ref_lse, ref_grads = run_reference(dict(q=q, k=k, v=v), dict(is_causal=True),
                                                ref_kw, cotangents)
    check_close(out, ref_out, dtype, "out", what="out")
    check_close(lse, ref_lse, dtype, "lse", what="lse")
    for name, g in grads.items():
        check_close(g, ref_grads[name], dtype, "grad", what="d" + name)
    # The origin matters: the same call at origin 0 draws another mask.
    at_zero = f(q, k, v, ops.dropout_seed)[0]
    assert np.abs(to64(out) - to64(at_zero)).max() > 0.1


def test_cpu_bfloat16_stacked_rows_with_features():
    """bfloat16 with >= 64 stacked query rows per head, where the CPU kernels
    would take the AVX512-BF16 dot-product path: with segment ids, sinks and
    dropout they take the float path and match the xla implementation."""
    rng = np.random.default_rng(13)
    B, T, S, N, K, H = 2, 67, 75, 4, 2, 24
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    kw = dict(query_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32),
              key_value_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), 1),
                                                jnp.int32),
              sinks=jnp.asarray(rng.standard_normal(N), jnp.float32), dropout_rate=0.25,
              dropout_rng=jax.random.key(3), is_causal=True)
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)

    def run(impl):
        def loss(q, k, v, sinks):
            out = jax_mfa.attention(q, k, v, implementation=impl, **{**kw, "sinks": sinks})
            return jnp.sum(out.astype(jnp.float32) * w), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            q, k, v, kw["sinks"])
        return out, grads

    out, grads = run("cpu")
    want_out, want_grads = run("xla")
    assert relative_error(out, want_out) < 2e-2
    for g, e in zip(grads, want_grads):
        assert relative_error(g, e) < 3e-2

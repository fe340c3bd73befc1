"""The Metal kernels (metal/) through the Metal emulator, with all its checkers
on (threadgroup races, barrier/SIMD divergence, bounds, threadgroup memory,
cross-threadgroup write conflicts): every feature, forward and gradients,
against implementation="cpu" (and "xla" for a few), for both block-size table
sets (M1/M2 and M3+), with chunked dispatches.

The generic test matrix in test_attention.py also runs "metal-emulated" (it is
listed by available_implementations()); this file covers what is specific to
the Metal kernels: head-dim buckets, block boundaries, the dbias ownership
modes, the dispatch chunking and the tables of both GPU families.
"""

from __future__ import annotations

import pathlib
import shutil
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
import reference

jax.config.update("jax_enable_x64", True)

pytestmark = pytest.mark.skipif(
    "metal-emulated" not in jax_mfa.available_implementations(),
    reason="the metal-emulated backend is not built")

# Relative (to the max magnitude) agreement with the CPU kernels, which use the
# same float32 accumulation; float16/bfloat16 differ by output rounding.
TOL = {jnp.float32: 3e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}


def _arr(rng, shape, dtype, scale=1.0):
    return jnp.asarray((rng.standard_normal(shape) * scale).astype(np.float32), dtype=dtype)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float64))
    b = np.asarray(jnp.asarray(b, jnp.float64))
    assert a.shape == b.shape
    inf = ~np.isfinite(b)
    assert np.array_equal(a[inf], b[inf]), "infinite entries differ"
    fin = ~inf
    if not fin.any():
        return 0.0
    assert np.isfinite(a[fin]).all(), "non-finite values where the reference is finite"
    return float(np.max(np.abs(a[fin] - b[fin])) / max(np.max(np.abs(b[fin])), 1e-30))


def _run(impl, q, k, v, bias, kw):
    """Output, lse and the gradients (q, k, v, bias) of a loss using both."""
    def loss(q, k, v, bias):
        out, lse = jax_mfa.attention(q, k, v, bias, return_residual=True, implementation=impl,
                                     **kw)
        o = out.astype(jnp.float32)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(o * jnp.cos(o)) + 0.5 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(q, k, v, bias)
    return out, lse, grads


def compare(rng, *, B=1, T=17, S=19, N=2, K=1, H=16, dtype=jnp.float32, bias_shape=None,
            mask_shape=None, against="cpu", **kw):
    q = _arr(rng, (B, T, N, H), dtype)
    k = _arr(rng, (B, S, K, H), dtype)
    v = _arr(rng, (B, S, K, H), dtype)
    bias = None if bias_shape is None else _arr(rng, bias_shape, jnp.float32)
    if mask_shape is not None:
        kw["mask"] = jnp.asarray(rng.random(mask_shape) > 0.4)
    got = _run("metal-emulated", q, k, v, bias, dict(kw))
    want = _run(against, q, k, v, bias, dict(kw))
    names = ["out", "lse", "dq", "dk", "dv", "dbias"]
    tol = TOL[dtype]
    for name, a, b in zip(names, [got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        # lse and dbias are float32 whatever the storage type.
        t = TOL[jnp.float32] * 4 if name in ("lse",) else tol
        if name == "dbias" and dtype != jnp.float32:
            t = 2 * tol
        err = _rel(a, b)
        assert err <= t, f"{name}: relative error {err:.3g} > {t:.3g} vs {against}"
    return got


# --- head dims (bucket padding), dtypes, odd sizes, GQA -----------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("H", [8, 64, 72, 80, 128, 256])
def test_head_dims_and_dtypes(rng, H, dtype):
    # T, S odd and crossing block boundaries (16/32-row, 64/128-column tiles).
    compare(rng, B=1, T=37, S=70 if H <= 128 else 33, N=4, K=2, H=H, dtype=dtype,
            is_causal=True)


@pytest.mark.parametrize("H", [1, 3, 20, 33, 44, 56, 88, 100, 104, 150, 200])
def test_odd_head_dims(rng, H):
    # 56, 88, 104: buckets of their own (every multiple of 8), staged with DB 8.
    compare(rng, T=9, S=21, N=2, K=2, H=H)


@pytest.mark.parametrize("H,family", [(168, "apple7"), (200, "apple9")])
def test_uneven_dkdv_head_split(rng, monkeypatch, H, family):
    # An odd number of 8-column head blocks split over two dK/dV threadgroups
    # (168 = 88 + 80, 200 = 104 + 96; float32 tables, test_register_budget in
    # tests/host checks that these split): the second one's columns past H
    # read as zero; the first one owns dbias.
    monkeypatch.setenv("JAX_MFA_EMULATED_FAMILY", family)
    compare(rng, T=9, S=21, N=2, K=1, H=H, bias_shape=(1, 2, 9, 21))


@pytest.mark.parametrize("T,S", [(1, 1), (1, 130), (130, 1), (65, 129)])
def test_sequence_edges(rng, T, S):
    compare(rng, T=T, S=S, N=2, K=1, H=32)


@pytest.mark.parametrize("N,K", [(6, 1), (6, 3), (4, 4)], ids=["mqa", "gqa", "mha"])
def test_grouped_heads(rng, N, K):
    compare(rng, B=2, T=21, S=40, N=N, K=K, H=16, is_causal=True)


# --- masks ----------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(is_causal=True),
    dict(local_window_size=4),
    dict(local_window_size=(7, 0)),
    dict(local_window_size=(0, 5)),
    dict(is_causal=True, local_window_size=(9, 9)),
], ids=["causal", "window", "left", "right", "causal-window"])
def test_structural_masks(rng, kw):
    # T > S and T < S: causal top-left leaves rows/columns empty. Against
    # "xla": with T > S the window's left edge passes the last key, a case
    # the CPU kernels' block span (problem.h key_span_of_rows) over-reaches.
    compare(rng, B=1, T=45, S=70, N=2, K=1, H=16, against="xla", **kw)
    compare(rng, B=1, T=70, S=23, N=2, K=1, H=16, against="xla", **kw)


@pytest.mark.parametrize("family", ["apple9", "apple7"])
@pytest.mark.parametrize("kw", [
    dict(is_causal=True),
    dict(local_window_size=(100, 90)),
    dict(B=2, is_causal=True, query_seq_lengths=[130, 136], key_value_seq_lengths=[136, 97]),
], ids=["causal", "window", "causal-lengths"])
def test_tile_classes(rng, monkeypatch, family, kw):
    # Just long enough (136 > the forward's 128 keys per step) that every
    # kernel has fully visible tiles (no per-element masks) next to diagonal,
    # window-edge and length-edge tiles (checked per element): a tile
    # misclassified as visible lets masked keys through.
    monkeypatch.setenv("JAX_MFA_EMULATED_FAMILY", family)
    kw = {k: jnp.asarray(v, jnp.int32) if k.endswith("lengths") else v for k, v in kw.items()}
    compare(rng, T=136, S=136, N=1, K=1, H=8, against="xla", **kw)


def test_lengths(rng):
    ql = jnp.asarray([30, 0, 7], jnp.int32)
    kl = jnp.asarray([11, 25, 0], jnp.int32)
    compare(rng, B=3, T=37, S=30, N=2, K=1, H=16, query_seq_lengths=ql,
            key_value_seq_lengths=kl, is_causal=True)


@pytest.mark.parametrize("shape", [(2, 2, 19, 41), (1, 2, 1, 41), (2, 1, 19, 1), (1, 1, 1, 1)])
def test_bool_mask(rng, shape):
    compare(rng, B=2, T=19, S=41, N=2, K=1, H=16, mask_shape=shape)


def test_fully_masked_rows(rng):
    mask = np.ones((1, 1, 24, 40), bool)
    mask[0, 0, 3] = False
    mask[0, 0, 17:] = False
    got = compare(rng, T=24, S=40, N=2, K=1, H=16, mask=jnp.asarray(mask))
    out, lse, (dq, _, _) = got
    assert np.all(np.asarray(out)[0, 17:] == 0) and np.all(np.asarray(out)[0, 3] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, 17:]))
    assert np.all(np.asarray(dq)[0, 3] == 0)


# --- logits: scale, softcap, bias (every dbias ownership mode) -------------------

def test_scale_and_softcap(rng):
    compare(rng, T=33, S=50, N=2, K=1, H=32, scale=0.7, softcap=3.0, is_causal=True)


@pytest.mark.parametrize("shape", [
    (2, 4, 29, 47),  # full: dK/dV kernel, one element per lane
    (1, 1, 29, 47),  # broadcast batch + heads: merged into one threadgroup
    (2, 1, 1, 47),   # broadcast queries: row-reduced per key
    (1, 4, 29, 1),   # constant along keys: row sums from the dQ kernel
    (1, 1, 1, 1),    # scalar
], ids=["full", "bcast-bn", "bcast-q", "keys-const", "scalar"])
def test_bias_and_dbias(rng, shape):
    compare(rng, B=2, T=29, S=47, N=4, K=2, H=16, bias_shape=shape, softcap=5.0, is_causal=True)


def test_bias_single_key(rng):
    compare(rng, B=2, T=9, S=1, N=2, K=1, H=8, bias_shape=(1, 2, 9, 1))


def test_everything_at_once_vs_xla(rng):
    ql = jnp.asarray([25, 13], jnp.int32)
    kl = jnp.asarray([40, 31], jnp.int32)
    compare(rng, B=2, T=27, S=44, N=4, K=2, H=24, bias_shape=(2, 1, 27, 44),
            mask_shape=(1, 4, 27, 44), softcap=4.0, local_window_size=(12, 3), is_causal=True,
            query_seq_lengths=ql, key_value_seq_lengths=kl, against="xla")


# --- host: chunked dispatches, both table sets, schedules, errors ------------------

def test_chunked_dispatch(rng, monkeypatch):
    # A tiny work limit splits every dispatch into one threadgroup per chunk.
    monkeypatch.setenv("JAX_MFA_METAL_MAX_WORK", "1")
    compare(rng, B=2, T=40, S=50, N=2, K=1, H=16, bias_shape=(1, 2, 40, 50), is_causal=True)


@pytest.mark.parametrize("shape,family", [
    ((1, 1, 23, 31), "apple9"),  # merged over batches and kv heads: 6 pairs, 6 slices
    ((1, 4, 1, 31), "apple7"),   # merged over batches only (query-broadcast dbias)
    ((3, 1, 23, 31), "apple9"),  # merged over kv heads only
], ids=["merge-both", "merge-batches", "merge-heads"])
def test_split_dkdv_threadgroups(rng, monkeypatch, shape, family):
    # A tiny per-threadgroup bound splits every merged dK/dV threadgroup into
    # one slice per (batch, kv head) pair, each with its own dbias slot that
    # the host sums (a slot shared by two threadgroups would be reported as a
    # write conflict by the emulator).
    monkeypatch.setenv("JAX_MFA_METAL_MAX_GROUP_WORK", "1")
    monkeypatch.setenv("JAX_MFA_EMULATED_FAMILY", family)
    compare(rng, B=3, T=23, S=31, N=4, K=2, H=16, bias_shape=shape, is_causal=True)


# Agreement of the split GQA group's gradients with the float64 reference
# (relative to the max magnitude): storage rounding of dK/dV dominates.
REF_TOL = {jnp.float32: 1e-4, jnp.float16: 6e-3, jnp.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype,N,K,group_work,H", [
    (jnp.float32, 5, 1, "1", 24),        # MQA: one query head per threadgroup
    (jnp.float16, 6, 2, "1", 40),        # GQA 3:1
    (jnp.bfloat16, 5, 1, "80000", 16),   # two slices of 3 and 2 heads (bound / 2)
], ids=["mqa-f32", "gqa-f16", "uneven-bf16"])
def test_split_gqa_group(rng, monkeypatch, dtype, N, K, group_work, H):
    # A small per-threadgroup bound splits the query heads of each kv head
    # over threadgroups (plan_backward's group_splits) that write float32
    # partial dK/dV, summed by the reduction kernel; the emulator reports a
    # partial written by two threadgroups as a write conflict.
    # "80000": Apple9, H 16 -> one group is 2 * 16 rows * 23 * 5 * 32 = 117760
    # multiply-adds, so two slices.
    monkeypatch.setenv("JAX_MFA_METAL_MAX_GROUP_WORK", group_work)
    B, T, S = 1, 23, 37
    q, k, v = (_arr(rng, (B, L, M, H), dtype) for L, M in ((T, N), (S, K), (S, K)))
    w = jnp.asarray(rng.standard_normal((B, T, N, H)))
    kw = dict(is_causal=True, local_window_size=(30, 2))

    def loss(impl):
        def f(q, k, v):
            out = jax_mfa.attention(q, k, v, implementation=impl, **kw)
            return jnp.sum(out.astype(jnp.float64) * w)
        return f

    got = jax.grad(loss("metal-emulated"), argnums=(0, 1, 2))(q, k, v)

    def ref(q, k, v):
        out, _ = reference.attention(jnp, q, k, v, is_causal=True, local_window_size=(30, 2))
        return jnp.sum(out * w)

    to64 = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    want = jax.grad(ref, argnums=(0, 1, 2))(to64(q), to64(k), to64(v))
    for name, a, b in zip(["dq", "dk", "dv"], got, want):
        assert a.dtype == dtype
        err = _rel(a, b)
        assert err <= REF_TOL[dtype], f"{name}: relative error {err:.3g} vs the float64 reference"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16],
                         ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("H", [8, 40, 72, 96, 128, 160, 192, 256])
def test_apple7_tables(rng, monkeypatch, H, dtype):
    monkeypatch.setenv("JAX_MFA_EMULATED_FAMILY", "apple7")
    compare(rng, B=1, T=45, S=70 if H <= 128 else 20, N=2, K=1, H=H, dtype=dtype,
            bias_shape=(1, 2, 1, 70 if H <= 128 else 20), is_causal=True)


def test_random_schedule(rng, monkeypatch):
    # Threads interleaved in a seeded random order between barriers.
    monkeypatch.setenv("JAX_MFA_EMULATOR_SEED", "12345")
    compare(rng, B=1, T=33, S=70, N=2, K=1, H=64, bias_shape=(1, 2, 33, 70), is_causal=True)


def test_float64_is_rejected(rng):
    q = jnp.zeros((1, 4, 1, 8), jnp.float64)
    with pytest.raises(Exception, match="float64"):
        jax.block_until_ready(jax_mfa.attention(q, q, q, implementation="metal-emulated"))


def test_not_the_default():
    impls = jax_mfa.available_implementations()
    assert impls[-1] == "metal-emulated"
    assert jax_mfa._api._resolve(None) != "metal-emulated"


# --- the single-source MSL the Metal launcher compiles at run time ----------------

ROOT = pathlib.Path(__file__).resolve().parents[1]


def embedded_source() -> str:
    """The text CMake embeds for Apple builds (cpp/metal_host/CMakeLists.txt):
    same files, same order, JAX_MFA_EMBEDDED on, `#pragma once` dropped."""
    files = [ROOT / "cpp/metal_emulator/msl/jax_mfa_instantiate.h",
             ROOT / "metal/dropout_philox.h", ROOT / "metal/attention_params.h",
             ROOT / "metal/attention_kernels.h", ROOT / "metal/attention_decode.h",
             ROOT / "metal/attention.metal"]
    text = "#define JAX_MFA_EMBEDDED 1\n"
    for f in files:
        text += f.read_text().replace("#pragma once", "") + "\n"
    return text


def test_embedded_source_is_self_contained(tmp_path):
    from jax_mfa import metal_emulator

    src = embedded_source()
    # Compiled from a directory without the headers: nothing may be included
    # but <metal_stdlib>. One type, one family and four head buckets (bits of
    # kHeadBuckets, whose order model_metal.py reads) keep the build short.
    plan = (ROOT / "cpp/metal_host/attention_plan.h").read_text()
    order = [int(x) for x in re.search(r"kHeadBuckets\[\] = \{([^}]*)\}", plan).group(1).split(",")]
    buckets = {hp: order.index(hp) for hp in (16, 72, 80, 256)}
    lib = metal_emulator.compile_source(
        src, {"JAX_MFA_METAL_FAMILIES": 2, "JAX_MFA_METAL_DTYPES": 2,
              "JAX_MFA_METAL_HEADS": sum(1 << bit for bit in buckets.values())},
        filename=str(tmp_path / "embedded.metal"))
    names = set(lib.kernels)
    expected = {f"mfa_{kind}_f16_h{hp}_" for kind in ("fwd", "dq", "dkdv") for hp in buckets}
    decode = ({f"mfa_decode_f16_h{hp}_c32" for hp in buckets}
              | {"mfa_decode_merge_f16", "mfa_dkdv_reduce_f16"})
    assert decode <= names
    names -= decode
    assert len(names) == len(expected) == 12
    assert {re.sub(r"p\d+_c\d+_d\d+(_o\d+)?_cache[01]+$", "", n) for n in names} == expected
    assert all(re.fullmatch(r"mfa_(fwd|dq|dkdv)_f16_h\d+_p16_c\d+_d\d+(_o\d+)?_cache[01]{1,2}", n)
               for n in names)
    assert "#include \"" not in re.sub(r"#ifndef JAX_MFA_EMBEDDED\n(#include[^\n]*\n)+#endif", "",
                                        src)


def _params_bytes(B, T, S, N, K, H, *, P, scale):
    """AttentionParams (metal/attention_params.h) for a plain forward."""
    ints = dict(batch=B, q_len=T, kv_len=S, q_heads=N, kv_heads=K, head_dim=H, group_size=N // K)
    head = np.zeros(9, np.int64).tobytes()  # bias and mask strides, dbias_slot
    body = np.array(list(ints.values()), np.int32).tobytes()
    body += np.array([scale, scale * np.log2(np.e), 1.0, np.log2(np.e)], np.float32).tobytes()
    rest = dict(has_softcap=0, causal=0, window_left=-1, window_right=-1, has_q_lengths=0,
                has_kv_lengths=0, has_bias=0, has_mask=0, dbias_mode=0, bias_batch_dim=1,
                bias_head_dim=1, bias_query_broadcast=0, num_row_blocks=-(-T // P), block_rows=P,
                merge_batches=0, merge_heads=0, group_offset=0, total_groups=0, kv_splits=1,
                pairs_per_split=1, has_segment_ids=0, segments_sorted=0, has_sinks=0,
                sinks_batched=0, has_dropout=0, dropout_broadcast_heads=0, dropout_threshold=0)
    body += np.array(list(rest.values()), np.int32).tobytes()
    body += np.array([1.0], np.float32).tobytes()  # dropout_keep_scale
    body += np.array([1, S], np.int32).tobytes()  # decode_splits, decode_keys_per_split
    body += np.array([1, N // K], np.int32).tobytes()  # group_splits, heads_per_group_split
    data = head + body
    return data + bytes(-len(data) % 8)


def _forward_with(lib, rng):
    B, T, S, N, K, H, P = 1, 16, 20, 1, 1, 16, 16
    q = rng.standard_normal((B, T, N, H)).astype(np.float16)
    k = rng.standard_normal((B, S, K, H)).astype(np.float16)
    v = rng.standard_normal((B, S, K, H)).astype(np.float16)
    out = np.zeros_like(q)
    lse = np.zeros((B, T, N), np.float32)
    empty = np.zeros(0, np.float32)
    params = _params_bytes(B, T, S, N, K, H, P=P, scale=0.25)
    assert len(params) == 248  # sizeof(AttentionParams), static_assert in attention_plan.cc
    lib.dispatch("mfa_fwd_f16_h16_p16_c128_d16_cache1", grid=(1,), threads=(P * 4,),
                 buffers=[params, q, k, v, empty, empty, empty, empty, out, lse] + [empty] * 4)
    s = 0.25 * np.einsum("bthd,bshd->bts", q.astype(np.float64), k.astype(np.float64))
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bts,bshd->bthd", p / p.sum(-1, keepdims=True), v.astype(np.float64))
    return out, ref


def test_planted_missing_barrier_is_caught(rng, tmp_path):
    """The checkers are live on these kernels: the embedded source runs right
    when dispatched directly, and the same source with one barrier removed (an
    operand staged into threadgroup memory by mfa_accumulate_abt, then read
    without a barrier) is reported as a threadgroup-memory race."""
    from jax_mfa import metal_emulator

    # Only the head bucket the forward below uses (bit 0: 16): every kernel
    # template is still compiled, once.
    defines = {"JAX_MFA_METAL_FAMILIES": 2, "JAX_MFA_METAL_DTYPES": 2, "JAX_MFA_METAL_HEADS": 1}
    src = embedded_source()
    good = metal_emulator.compile_source(src, defines, filename=str(tmp_path / "embedded.metal"))
    out, ref = _forward_with(good, rng)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=4e-3)

    staged = ("mfa_stage<T, C, DB, NT>(tile, b_base, b_stride, b_rows, d0, H, tid);\n"
              "    threadgroup_barrier(mem_flags::mem_threadgroup);\n")
    assert staged in src
    planted = src.replace(staged, staged.split("\n")[0] + "\n", 1)
    bad = metal_emulator.compile_source(planted, defines, filename=str(tmp_path / "planted.metal"))
    with pytest.raises(Exception, match="(?i)race"):
        _forward_with(bad, rng)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ is not installed")
def test_attention_kernels_compile_and_run_with_clang(rng, tmp_path):
    """The attention kernels also build with clang, whose distinct address
    spaces reject what Apple's compiler would (the extension's build uses the
    project's compiler, g++ in CI), and give the same forward."""
    from jax_mfa import metal_emulator

    # Every kernel template, at the head bucket the forward below uses (16).
    defines = {"JAX_MFA_METAL_FAMILIES": 2, "JAX_MFA_METAL_DTYPES": 2, "JAX_MFA_METAL_HEADS": 1}
    lib = metal_emulator.compile_source(embedded_source(), defines, cxx=shutil.which("clang++"),
                                        filename=str(tmp_path / "embedded.metal"))
    out, ref = _forward_with(lib, rng)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=4e-3)

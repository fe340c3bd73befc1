"""The instruction profile (dispatch(..., profile=True)) on kernels whose counts are derived by hand,
on MLX's steel GEMM (counts from its block sizes) and on jax_mfa's own forward kernel (metal/)."""

import os
import pathlib
import sys

import numpy as np
import pytest

import jax_mfa.metal_emulator as me

sys.path.insert(0, os.path.dirname(__file__))
import mlx_peer  # noqa: E402

ZERO_SPECIAL = ("exp10", "log2", "log10", "sqrt", "rsqrt", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos",
                "atan", "atan2", "pow", "powr", "erf")


@pytest.mark.parametrize("check", [True, False])
def test_scalar_kernel_counts(kernel_lib, check):
    lib = kernel_lib("profile.metal")
    groups = 3
    x = np.linspace(-1, 1, 64 * groups, dtype=np.float32)
    out = np.zeros_like(x)
    prof = lib.dispatch("profile_scalar", grid=groups, threads=64, buffers=[x, out], threadgroup_memory=[256],
                        check=check, profile=True)
    per_sg = dict(device_bytes_read=128, device_bytes_written=16, threadgroup_bytes_written=128,
                  threadgroup_bytes_read=128, exp=32, exp2=32, tanh=32, log=4, threadgroup_barriers=1,
                  simdgroup_barriers=1, simd_reductions=1, simd_shuffles=1,
                  device_accesses=32 + 4, threadgroup_accesses=32 + 32)
    assert (prof.threads_per_threadgroup, prof.simdgroups_per_threadgroup, prof.threadgroups) == (64, 2, 3)
    assert prof.simdgroups == 6
    assert prof.threadgroup_memory_bytes == 256
    for name, count in prof.total.items():
        assert count == 6 * per_sg.get(name, 0), name
    for s in range(2):
        for name, count in prof.per_simdgroup[s].items():
            assert count == 3 * per_sg.get(name, 0), (s, name)
    assert prof.max_simdgroup == {k: per_sg.get(k, 0) for k in prof.total}
    assert prof.mean_per_simdgroup()["exp"] == 32


def test_matrix_kernel_counts(kernel_lib):
    lib = kernel_lib("profile.metal")
    a = np.ones(64, np.float16)
    c = np.zeros(64, np.float16)
    v = np.zeros(32, np.float32)
    prof = lib.dispatch("profile_matrix", grid=1, threads=32, buffers=[a, c, v], profile=True)
    t = prof.total
    assert t["simdgroup_matrix_multiply_accumulate"] == 3
    assert t["simdgroup_matrix_multiply_accumulate_16bit"] == 3  # half x half, all three
    # load/store instructions per lane (matrix loads/stores are counted above, not here)
    assert t["device_accesses"] == 32 and t["threadgroup_accesses"] == 64
    assert (t["simdgroup_matrix_load_device"], t["simdgroup_matrix_load_threadgroup"]) == (1, 1)
    assert (t["simdgroup_matrix_store_device"], t["simdgroup_matrix_store_threadgroup"]) == (1, 1)
    # matrix loads/stores move 64 elements of 2 bytes; lanes add 2 x 32 threadgroup halves and 32 floats
    assert t["device_bytes_read"] == 128 and t["device_bytes_written"] == 128 + 32 * 4
    assert t["threadgroup_bytes_read"] == 128 and t["threadgroup_bytes_written"] == 128 + 64 * 2
    assert t["exp"] == 32 * (1 + 4)  # exp(half): one call per lane; exp(float4): four
    assert t["threadgroup_barriers"] == 1 and t["simdgroup_barriers"] == 0
    assert prof.threadgroup_memory_bytes == 2 * 128
    assert all(t[k] == 0 for k in ZERO_SPECIAL)
    np.testing.assert_array_equal(v, np.float32(2 * np.exp(np.float32(np.float16(np.exp(np.float16(0.5)))))))


def test_profile_off_returns_none(kernel_lib):
    lib = kernel_lib("profile.metal")
    x = np.zeros(64, np.float32)
    assert lib.dispatch("profile_scalar", grid=1, threads=64, buffers=[x, x.copy()], threadgroup_memory=[256]) is None


def test_mlx_gemm_counts():
    """steel GEMM bm = bn = 32, bk = 16, 2 x 2 simdgroups: each simdgroup owns a 16 x 16 tile (2 x 2
    fragments) and does 2 x 2 x (bk / 8) = 8 multiply-accumulates per K block; K = 40 is 2 full blocks
    plus a remainder block. Barriers per simdgroup: one mem_none at the start, two per full block, one
    before the remainder's product."""
    lib = mlx_peer.load("steel_gemm.metal")
    rng = np.random.default_rng(0)
    M, N, K = 70, 66, 40
    a = mlx_peer.random(rng, (1, M, K), "float32")
    b = mlx_peer.random(rng, (1, K, N), "float32")
    d, prof = mlx_peer.gemm(lib, "float32", False, False, a, b, profile=True)
    ref, err = mlx_peer.gemm_reference(False, False, a, b)
    mlx_peer.assert_close(d, ref, "float32", err)
    tiles = 3 * 3
    assert prof.threadgroups == tiles and prof.simdgroups_per_threadgroup == 4
    assert prof.total["simdgroup_matrix_multiply_accumulate"] == tiles * 4 * 8 * 3
    assert prof.total["threadgroup_barriers"] == tiles * 4 * (1 + 2 * 2 + 1)
    assert prof.total["device_bytes_written"] == M * N * 4  # each output element once
    # threadgroup tiles A (32 x (16 + 4)) and B (16 x (32 + 4)) floats: kernel-scope arrays
    assert prof.threadgroup_memory_bytes == (32 * 20 + 16 * 36) * 4


ROOT = pathlib.Path(__file__).resolve().parents[2]
# metal/attention_params.h's AttentionParams (64-bit members first, then 32-bit ones).
PARAMS = np.dtype([("bias_strides", "<i8", 4), ("mask_strides", "<i8", 4), ("dbias_slot", "<i8")]
                  + [(n, "<i4") for n in ("batch", "q_len", "kv_len", "q_heads", "kv_heads", "head_dim",
                                          "group_size")]
                  + [(n, "<f4") for n in ("scale", "scale_log2", "softcap", "softcap_log2")]
                  + [(n, "<i4") for n in ("has_softcap", "causal", "window_left", "window_right", "has_q_lengths",
                                          "has_kv_lengths", "has_bias", "has_mask", "dbias_mode", "bias_batch_dim",
                                          "bias_head_dim", "bias_query_broadcast", "num_row_blocks", "block_rows",
                                          "merge_batches", "merge_heads", "group_offset", "total_groups",
                                          "kv_splits", "pairs_per_split", "has_segment_ids",
                                          "segments_sorted", "has_sinks", "sinks_batched", "has_dropout",
                                          "dropout_broadcast_heads")]
                  + [("dropout_threshold", "<u4"), ("dropout_keep_scale", "<f4")]
                  + [(name, "<i4") for name in ("decode_splits", "decode_keys_per_split",
                                                "group_splits", "heads_per_group_split")],
                  align=True)
assert PARAMS.itemsize == 248  # sizeof(AttentionParams), as cpp/metal_host/attention_plan.cc asserts


def _run_forward(lib, name, q, k, v, rows):
    """One plain forward (no mask, bias or dropout) of a metal/ forward kernel with P = rows, on
    (B, T, N, H) inputs; returns (out, profile)."""
    B, T, N, H = q.shape
    S = k.shape[1]
    out = np.full_like(q, np.nan)
    lse = np.full((B, T, N), np.nan, np.float32)
    p = np.zeros((), PARAMS)
    scale = H ** -0.5
    blocks = -(-T // rows)
    for field, val in dict(batch=B, q_len=T, kv_len=S, q_heads=N, kv_heads=N, head_dim=H, group_size=1,
                           scale=scale, scale_log2=scale * np.log2(np.e), window_left=-1, window_right=-1,
                           num_row_blocks=blocks, block_rows=rows, merge_batches=1, merge_heads=1,
                           total_groups=blocks * N * B, kv_splits=1).items():
        p[field] = val
    prof = lib.dispatch(name, grid=blocks * N * B, threads=rows * 4,
                        buffers=[p.tobytes(), q, k, v, None, None, None, None, out, lse] + [None] * 4,
                        profile=True)
    return out, prof


def _reference(q, k, v):
    t = lambda x: x.astype(np.float64).transpose(0, 2, 1, 3)  # noqa: E731
    return mlx_peer.attention_reference(t(q), t(k), t(v), q.shape[-1] ** -0.5)[0].transpose(0, 2, 1, 3)


def test_apple9_bfloat16_kernels_multiply_bfloat_matrices():
    """bfloat16 storage on M3+ (Apple9): Q and K are bfloat matrices, so every S = Q K^T
    multiply-accumulate is 16-bit x 16-bit ((16 / 8) x (128 / 8) per simdgroup and key block); O += P V
    multiplies float P by bfloat V (not counted as 16-bit). One head bucket of the Apple9 library
    (attention.metal's instantiation, as the launcher compiles it)."""
    import ml_dtypes

    lib = me.load(str(ROOT / "metal" / "attention_bf16.metal"), include_paths=[str(ROOT / "metal")],
                  defines={"JAX_MFA_METAL_FAMILIES": 2, "JAX_MFA_METAL_HEADS": 1})  # bucket 16 only
    rng = np.random.default_rng(2)
    B, T, S, N, H = 1, 19, 256, 1, 13  # the last row block and the head dim are partial
    q, k, v = (rng.standard_normal((B, L, N, H)).astype(ml_dtypes.bfloat16) for L in (T, S, S))
    out, prof = _run_forward(lib, "mfa_fwd_bf16_h16_p16_c128_d16_cache1", q, k, v, rows=16)
    simdgroups, key_blocks = 3, S // 128  # 2 blocks of 16 rows; rows 24-31 (past T) do no work
    qk = simdgroups * key_blocks * (16 // 8) * (128 // 8)
    assert prof.total["simdgroup_matrix_multiply_accumulate"] == 2 * qk
    assert prof.total["simdgroup_matrix_multiply_accumulate_16bit"] == qk
    np.testing.assert_allclose(out.astype(np.float64), _reference(q, k, v), rtol=0, atol=2e-2)


def test_own_forward_kernel_counts():
    """metal/attention.metal's forward (head dim 64, P = 16 rows, C = 128 keys per block): per simdgroup
    and key block, S = Q K^T takes (64 / 8) x (128 / 8) and O += P V (64 / 8) x (128 / 8)
    multiply-accumulates; the online softmax calls exp2 once per lane for the rescale and once per
    score element (2 x 16 per lane)."""
    lib = me.load(str(pathlib.Path(__file__).parent / "kernels" / "own_forward.metal"),
                  include_paths=[str(ROOT / "metal")])
    rng = np.random.default_rng(1)
    B, T, S, N, H = 1, 32, 256, 2, 64
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, N, H)).astype(np.float32)
    v = rng.standard_normal((B, S, N, H)).astype(np.float32)
    out, prof = _run_forward(lib, "mfa_fwd_f32_h64_p16_c128_d32_cache1", q, k, v, rows=16)
    blocks = T // 16
    np.testing.assert_allclose(out, _reference(q, k, v), rtol=1e-4, atol=1e-5)
    simdgroups = blocks * N * B * 2
    key_blocks = S // 128
    assert prof.total["simdgroup_matrix_multiply_accumulate"] == simdgroups * key_blocks * 2 * 8 * 16
    assert prof.total["exp2"] == simdgroups * 32 * key_blocks * (1 + 2 * 16)
    # Interior K and V tiles move in 16-byte chunks (4 floats): per threadgroup and key block,
    # 2 tiles x 128 rows x 64 columns / 4 loads from device memory and as many threadgroup stores;
    # besides them each lane loads its Q elements (2 x 8) and stores its O elements (2 x 8), and
    # 8 lanes per simdgroup store a lse.
    groups = blocks * N * B
    chunks = 2 * 128 * 64 // 4
    assert prof.total["threadgroup_accesses"] == groups * key_blocks * chunks
    assert prof.total["device_accesses"] == groups * (key_blocks * chunks + 64 * (16 + 16) + 2 * 8)


def test_mlx_attention_counts():
    """steel attention, head dim 64 (bq 32, bk 32, 4 simdgroups of 8 query rows): per simdgroup and
    key block, S = Q K^T takes 1 x (32 / 8) x (64 / 8) and O += P V 1 x (64 / 8) x (32 / 8)
    multiply-accumulates; each lane calls exp2 once per score element it holds (8 x 32 / 32) and
    once for the running-max rescale."""
    lib = mlx_peer.load("steel_attention.metal")
    rng = np.random.default_rng(2)
    D, T, S = 64, 256, 256
    q, k, v = (mlx_peer.random(rng, (1, 1, n, D), "float16") for n in (T, S, S))
    o, prof = mlx_peer.attention(lib, "float16", q, k, v, D ** -0.5, profile=True)
    ref, err = mlx_peer.attention_reference(q, k, v, D ** -0.5)
    mlx_peer.assert_close(o, ref, "float16", err)
    simdgroups, key_blocks = (T // 32) * 4, S // 32
    assert prof.total["simdgroup_matrix_multiply_accumulate"] == simdgroups * key_blocks * (32 + 32)
    assert prof.total["exp2"] == simdgroups * key_blocks * 32 * (8 + 1)
    assert prof.max_simdgroup["exp2"] == key_blocks * 32 * 9

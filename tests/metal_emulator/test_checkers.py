"""Planted bugs, each reported with the right exception; scheduling seeds."""

import shutil
import textwrap

import numpy as np
import pytest

import jax_mfa.metal_emulator as me


@pytest.fixture(scope="module")
def bugs(kernel_lib):
    return kernel_lib("bugs.metal")


def test_missing_barrier_is_a_race(bugs):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(me.RaceError, match=r"missing_barrier.*threadgroup \(0,0,0\).*threadgroup\(0\) region"):
        bugs.dispatch("missing_barrier", grid=1, threads=64, buffers=[x, out], threadgroup_memory=[256])
    # With checking off the same kernel runs (the result is undefined on a GPU).
    bugs.dispatch("missing_barrier", grid=1, threads=64, buffers=[x, out], threadgroup_memory=[256], check=False)


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_race_found_whatever_the_order(bugs, seed):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(me.RaceError):
        bugs.dispatch("missing_barrier", grid=2, threads=64, buffers=[x, out], threadgroup_memory=[256], seed=seed)


def test_barrier_in_divergent_branch(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.DivergenceError, match="divergent_barrier.*barrier divergence"):
        bugs.dispatch("divergent_barrier", grid=1, threads=64, buffers=[out], threadgroup_memory=[256])


def test_two_different_barriers(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.DivergenceError, match=r"reached threadgroup_barrier at .*bugs.metal:\d+ while"):
        bugs.dispatch("two_barriers", grid=1, threads=64, buffers=[out])


def test_shuffle_in_divergent_branch(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.DivergenceError, match="simd_shuffle_xor"):
        bugs.dispatch("divergent_shuffle", grid=2, threads=32, buffers=[out])


def test_threadgroup_memory_overflow(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.ThreadgroupMemoryError, match=r"out-of-bounds write of 4 bytes at byte offset 256"):
        bugs.dispatch("tg_overflow", grid=1, threads=64, buffers=[out], threadgroup_memory=[256])


def test_threadgroup_memory_request_over_32k(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.ThreadgroupMemoryError, match="32 KiB"):
        bugs.dispatch("tg_overflow", grid=1, threads=64, buffers=[out], threadgroup_memory=[32768 + 16])
    with pytest.raises(me.ThreadgroupMemoryError, match="multiple of 16"):
        bugs.dispatch("tg_overflow", grid=1, threads=64, buffers=[out], threadgroup_memory=[100])
    with pytest.raises(me.ThreadgroupMemoryError, match=r"threadgroup\(0\)"):
        bugs.dispatch("tg_overflow", grid=1, threads=64, buffers=[out])


def test_kernel_scope_threadgroup_array_over_32k(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.ThreadgroupMemoryError, match="32 KiB"):
        bugs.dispatch("tg_static_too_big", grid=1, threads=64, buffers=[out])


def test_out_of_bounds_read(bugs):
    x = np.zeros(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(me.OutOfBoundsError, match=r"out-of-bounds read .* byte offset 256 of buffer\(0\)"):
        bugs.dispatch("oob_read", grid=2, threads=32, buffers=[x, out])


def test_out_of_bounds_write(bugs):
    x = np.zeros(64, np.float32)
    out = np.zeros(64, np.float32)
    with pytest.raises(me.OutOfBoundsError, match=r"out-of-bounds write .* of buffer\(1\).*thread 31"):
        bugs.dispatch("oob_write", grid=2, threads=32, buffers=[x, out])


def test_two_threadgroups_write_one_element(bugs):
    out = np.zeros(32, np.float32)
    with pytest.raises(me.WriteConflictError, match=r"buffer\(0\).*threadgroup \("):
        bugs.dispatch("write_conflict", grid=4, threads=32, buffers=[out])
    bugs.dispatch("write_conflict", grid=1, threads=32, buffers=[out])  # one threadgroup: fine


def test_simdgroup_store_race_between_simdgroups(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.RaceError, match="simdgroup 1"):
        bugs.dispatch("simd_store_race", grid=1, threads=64, buffers=[out], threadgroup_memory=[256])


def test_invalid_arguments(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.MetalEmulatorError, match="no kernel named"):
        bugs.dispatch("nope", grid=1, threads=1, buffers=[out])
    with pytest.raises(me.MetalEmulatorError, match="1024"):
        bugs.dispatch("oob_read", grid=1, threads=(32, 33), buffers=[out, out])
    with pytest.raises(me.MetalEmulatorError, match=r"buffer\(1\)\]\] not provided"):
        bugs.dispatch("oob_read", grid=1, threads=32, buffers=[out])


def test_seeded_scheduling(kernel_lib):
    lib = kernel_lib("barrier.metal")

    def order(seed):
        t = np.zeros(128, np.uint32)
        lib.dispatch("ticket_order", grid=2, threads=64, buffers=[t], seed=seed)
        return t

    base = order(None)
    # Deterministic by default: round robin, where the last thread to reach the
    # barrier goes on first (thread 63 gets ticket 0, thread i ticket i + 1).
    np.testing.assert_array_equal(base, np.tile((np.arange(64) + 1) % 64, 2))
    np.testing.assert_array_equal(order(None), base)
    a, b, c = order(7), order(7), order(8)
    np.testing.assert_array_equal(a, b)  # same seed, same order
    assert not np.array_equal(a, base) and not np.array_equal(a, c)
    for t in (a, c):
        for g in range(2):
            assert sorted(t[64 * g: 64 * (g + 1)]) == list(range(64))
    # Race-free kernels give the same result under any order.
    x = np.random.default_rng(0).integers(-9, 9, 4 * 256).astype(np.float32)
    for seed in (None, 1, 2):
        out = np.zeros(4, np.float32)
        lib.dispatch("block_sum", grid=4, threads=256, buffers=[x, out], threadgroup_memory=[1024], seed=seed)
        np.testing.assert_array_equal(out, x.reshape(4, 256).sum(1))


ADDRESS_SPACE_BUG = textwrap.dedent("""
    #include <metal_stdlib>
    using namespace metal;
    static float first(device const float* p) { return p[0]; }
    kernel void mixes_spaces(device float* out [[buffer(0)]],
                             threadgroup float* tg [[threadgroup(0)]],
                             uint tid [[thread_index_in_threadgroup]]) {
      tg[tid] = 1.0f;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      out[tid] = first(tg);  // BUG: threadgroup pointer where a device pointer is expected
    }
""")


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ not installed")
def test_address_space_mistake_fails_to_compile_with_clang():
    with pytest.raises(me.CompileError) as e:
        me.compile_source(ADDRESS_SPACE_BUG, cxx=shutil.which("clang++"))
    assert "first" in e.value.log
    # The fixed kernel compiles and runs.
    ok = ADDRESS_SPACE_BUG.replace("device const float* p", "threadgroup const float* p")
    lib = me.compile_source(ok, cxx=shutil.which("clang++"))
    out = np.zeros(32, np.float32)
    lib.dispatch("mixes_spaces", grid=1, threads=32, buffers=[out], threadgroup_memory=[128])
    assert (out == 1).all()


def test_address_space_mistake_fails_to_compile_with_default_compiler():
    with pytest.raises(me.CompileError):
        me.compile_source(ADDRESS_SPACE_BUG)


def test_compile_error_has_log():
    with pytest.raises(me.CompileError) as e:
        me.compile_source("#include <metal_stdlib>\nkernel void k(device float* p [[buffer(0)]]) { p[0] = q; }\n")
    assert "q" in e.value.log


def test_device_memory_race_within_threadgroup(bugs):
    out = np.zeros(64, np.float32)
    with pytest.raises(me.RaceError, match=r"device memory race .* buffer\(0\)"):
        bugs.dispatch("device_race_in_group", grid=1, threads=32, buffers=[out])
    out = np.zeros(128, np.float32)
    bugs.dispatch("device_exchange_ok", grid=2, threads=32, buffers=[out])
    np.testing.assert_array_equal(out.reshape(2, 64)[:, 32:], np.tile((np.arange(32) + 1) % 32, (2, 1)))


def test_reading_another_threadgroups_output(bugs):
    # Found when the reading threadgroup runs after the writing one (threadgroups
    # start in order; with 64 of them at least one such pair is all but certain).
    out = np.zeros(32 * 64, np.float32)
    with pytest.raises(me.WriteConflictError, match="reads an element that threadgroup"):
        bugs.dispatch("read_other_group", grid=64, threads=32, buffers=[out])

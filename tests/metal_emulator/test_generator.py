"""The source pass: signature parsing and address-space rewriting."""

import numpy as np
import pytest

import jax_mfa.metal_emulator as me
from jax_mfa.metal_emulator import _generator as gen

SRC = """
#include <metal_stdlib>
using namespace metal;
constant float kScale = 2.0f;
constant constexpr int kN = 4;
static inline float load2(const device float* p, uint i) { return p[i] * kScale; }
static inline void put(threadgroup float* t, uint i, float v) { t[i] = v; }
template <typename T>
[[kernel]] void tk(device const T* a [[buffer(0)]], device T* b [[ buffer(1) ]],
                   constant uint& n [[buffer(2)]], uint i [[thread_position_in_grid]]) {
  if (i < n) b[i] = a[i];
}
kernel void k2(device float* out [[buffer(1)]],
               const device float* in [[buffer(0)]],
               threadgroup float* scratch [[threadgroup(0)]],
               ushort2 lid [[thread_position_in_threadgroup]],
               uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float local[kN * 8];
  threadgroup float total;
  thread float acc = 0.0f;
  thread float& ref = acc;
  device float4* out4 = reinterpret_cast<device float4*>(out);
  put(scratch, tid, load2(in, tid));
  local[tid] = float(lid.x);
  if (tid == 0) total = 0.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  ref += scratch[tid] + local[tid];
  if (tid == 0) { total = 1.0f; out4[0] = float4(total); }
  out[4 + tid] = acc;
}
"""


def test_parse_kernels():
    ks = {k.name: k for k in gen.parse_kernels(SRC)}
    assert set(ks) == {"tk", "k2"}
    assert ks["tk"].is_template and not ks["k2"].is_template
    assert [(p.attribute, p.index) for p in ks["tk"].params] == [("buffer", "0"), ("buffer", "1"), ("buffer", "2"),
                                                                ("thread_position_in_grid", None)]
    assert [p.attribute for p in ks["k2"].params] == ["buffer", "buffer", "threadgroup", "thread_position_in_threadgroup",
                                                      "thread_index_in_threadgroup"]


def test_rewrite_and_run():
    text, _ = gen.generate(SRC)
    assert "::metal::device_ptr<const float>" in text
    assert "static_cast<::metal::device_ptr<float4>>" in text
    assert "const float kScale" in text
    lib = me.compile_source(SRC)
    assert set(lib.kernels) == {"k2"}  # the template is not instantiated
    out = np.zeros(4 + 32, np.float32)
    x = np.arange(32, dtype=np.float32)
    lib.dispatch("k2", grid=1, threads=(8, 4), buffers=[x, out], threadgroup_memory=[128])
    np.testing.assert_array_equal(out[:4], 1.0)
    np.testing.assert_array_equal(out[4:], 2 * x + np.tile(np.arange(8), 4))


def test_missing_attribute_is_a_compile_error():
    with pytest.raises(me.CompileError, match="no Metal attribute"):
        me.compile_source("kernel void f(device float* p) {}")


def test_defines_and_gaps_in_buffer_indices():
    src = """
    #include <metal_stdlib>
    using namespace metal;
    kernel void fill(device float* out [[buffer(2)]], uint i [[thread_position_in_grid]]) { out[i] = VALUE; }
    """
    lib = me.compile_source(src, defines={"VALUE": "3.5f"})
    out = np.zeros(16, np.float32)
    lib.dispatch("fill", grid=1, threads=16, buffers=[None, None, out])
    assert (out == 3.5).all()

"""MSL that other people's kernels use (MLX's idioms), each on a small kernel of its own:
function constants and absent arguments, unbound never-read arguments, address-space qualifiers
on member functions and overloads on address space, address-space macros, attribute lists and
host_name instantiation, half/bfloat element conversions, type traits, fill shuffles, constexpr
limits, and the worker-pool option."""

import numpy as np
import pytest

import jax_mfa.metal_emulator as me

ml_dtypes = pytest.importorskip("ml_dtypes")

FC_SRC = """
#include <metal_stdlib>
using namespace metal;
struct Extra { int ldc; float alpha; float beta; };
constant bool use_extra [[function_constant(100)]];
constant int repeat [[function_constant(7)]];
constant float gain [[function_constant(8)]];
kernel void fc(device float* out [[buffer(0)]],
               const device float* c [[buffer(1), function_constant(use_extra)]],
               const constant Extra* extra [[buffer(2), function_constant(use_extra)]],
               constant int& unused_count [[buffer(3)]],
               uint i [[thread_position_in_grid]]) {
  const float alpha = extra->alpha;  // read even when absent: dead code for Apple's compiler
  float v = float(i) * (is_function_constant_defined(gain) ? float(gain) : 1.0f);
  for (int r = 1; r < repeat; ++r) v += 1.0f;
  if (use_extra) v = alpha * v + extra->beta * c[i];
  out[i] = is_function_constant_defined(gain) ? v : -1.0f;
}
kernel void fc_live_read(device float* out [[buffer(0)]],
                         const device float* c [[buffer(1), function_constant(use_extra)]],
                         uint i [[thread_position_in_grid]]) {
  out[i] = c[i];  // a live read of an absent argument
}
kernel void reads_count(device int* out [[buffer(0)]], constant int& count [[buffer(1)]],
                        uint i [[thread_position_in_grid]]) {
  out[i] = count;
}
"""


@pytest.fixture(scope="module")
def fc_lib():
    return me.compile_source(FC_SRC)


def test_function_constants_by_name_and_index(fc_lib):
    assert fc_lib.function_constants == {"use_extra": (100, "bool"), "repeat": (7, "int32"), "gain": (8, "float32")}
    out = np.full(8, np.nan, np.float32)
    c = np.arange(8, dtype=np.float32)
    extra = np.array([(8, 2.0, 0.5)], dtype=[("ldc", "<i4"), ("alpha", "<f4"), ("beta", "<f4")]).tobytes()
    fc_lib.dispatch("fc", grid=1, threads=8, buffers=[out, c, extra],
                    function_constants={"use_extra": True, 7: 3, "gain": 1.5})
    np.testing.assert_array_equal(out, 2.0 * (np.arange(8) * 1.5 + 2) + 0.5 * c)


@pytest.mark.parametrize("check", [True, False])
def test_absent_arguments_need_no_binding_and_dead_reads_pass(fc_lib, check):
    out = np.full(8, np.nan, np.float32)
    fc_lib.dispatch("fc", grid=1, threads=8, buffers=[out], check=check,
                    function_constants={"use_extra": False, "repeat": 1, "gain": 2.0})
    np.testing.assert_array_equal(out, np.arange(8) * 2.0)


def test_live_read_past_an_absent_argument_is_reported(fc_lib):
    out = np.zeros(8, np.float32)
    with pytest.raises(me.OutOfBoundsError, match=r"buffer\(1\), which is absent .*function_constant\(100\)\]\] is false"):
        fc_lib.dispatch("fc_live_read", grid=1, threads=8, buffers=[out], function_constants={"use_extra": False})


def test_undefined_function_constant_read_and_bad_name(fc_lib):
    out = np.zeros(8, np.float32)
    with pytest.raises(me.MetalEmulatorError, match="function constant 'repeat'.*no value"):
        fc_lib.dispatch("fc", grid=1, threads=8, buffers=[out], function_constants={"use_extra": False, "gain": 1})
    with pytest.raises(ValueError, match="'nope' is not a function constant"):
        fc_lib.dispatch("fc", grid=1, threads=8, buffers=[out], function_constants={"nope": 1})


def test_undefined_constant_is_reported_by_is_function_constant_defined(fc_lib):
    out = np.zeros(8, np.float32)
    fc_lib.dispatch("fc", grid=1, threads=8, buffers=[out], function_constants={"use_extra": False, "repeat": 1})
    np.testing.assert_array_equal(out, -1.0)


def test_unbound_constant_reference(fc_lib):
    out = np.zeros(4, np.int32)
    with pytest.raises(me.MetalEmulatorError, match=r"buffer\(1\)\]\] not provided"):
        fc_lib.dispatch("reads_count", grid=1, threads=4, buffers=[out])  # read by the kernel: must be bound
    fc_lib.dispatch("reads_count", grid=1, threads=4, buffers=[out, 5])
    assert (out == 5).all()


ADDRESS_SPACE_SRC = """
#include <metal_stdlib>
using namespace metal;
#if defined(__METAL__)
#define MY_CONST constant
#else
#define MY_CONST
#endif
#define MY_SPACE constant
#define MY_STATIC static constant constexpr const
MY_SPACE int kTable[2] = {3, 4};
struct Counter {
  int n;
  MY_STATIC int kStep = 2;
  Counter(int n_) thread : n(n_) {}
  Counter(int n_) threadgroup : n(n_) {}
  int get() const thread { return n; }
  int get() const device { return n + 1000; }
  int get() const constant { return n + 2000; }
  void bump() thread { n += kStep; }
};
inline int twice(thread const int& x) { return 2 * x; }
inline int twice(device const int& x) { return 2 * x; }
inline int pick(const device int* p) { return p[0]; }
inline int pick(constant int* p) { return p[1] + 100; }
static MY_CONST constexpr int kBias = 1;
template <typename T>
[[kernel, max_total_threads_per_threadgroup(64)]] void spaces(device int* out [[buffer(0)]],
                                                              constant int* table [[buffer(1)]],
                                                              const device int* dev [[buffer(2)]],
                                                              uint i [[thread_position_in_grid]]) {
  thread Counter c(static_cast<int>(i));
  c.bump();
  const constant auto* t = table;
  out[i] = T(twice(c.get()) + pick(t) + pick(dev) + kTable[1] + kBias);
}
#define my_instantiate(name, func, ...) \\
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
my_instantiate("spaces_int", spaces, int)
template [[host_name("spaces_uint")]] [[kernel]] decltype(spaces<uint>) spaces<uint>;
"""


def test_address_spaces_attributes_and_host_name_instantiation():
    lib = me.compile_source(ADDRESS_SPACE_SRC)
    assert set(lib.kernels) == {"spaces_int", "spaces_uint"}
    for name in lib.kernels:
        out = np.zeros(8, np.int32)
        table = np.array([7, 9], np.int32)
        lib.dispatch(name, grid=1, threads=8, buffers=[out, table, table])
        np.testing.assert_array_equal(out, 2 * (np.arange(8) + 2) + 109 + 7 + 4 + 1)


CONVERSIONS_SRC = """
#include <metal_stdlib>
using namespace metal;
static_assert(is_same_v<remove_cv_t<const int>, int> && enable_if_t<true, bool_constant<true>>::value, "");
static_assert(is_floating_point_v<half> && is_floating_point_v<bfloat> && !is_integral<half>::value, "");
static_assert(is_same_v<conditional_t<true, remove_addrspace_t<float>, int>, float>, "");
static_assert(numeric_limits<half>::max() == 65504.0h && -numeric_limits<bfloat>::infinity() < 0.0f, "");
constexpr half kHalf = 1.5h * 2.0h;
static_assert(float(kHalf) == 3.0f, "");
METAL_FUNC float square(float x) { return x * x; }
template <typename T>
kernel void convert(const device T* x [[buffer(0)]], device float* out [[buffer(1)]], device T* y [[buffer(2)]],
                    uint i [[thread_position_in_grid]]) {
  float a = x[i];            // a device element as a float
  a += x[i];                 // in +=
  float b = square(x[i]);    // as a float argument
  float c = exp(x[i]) * x[i] + 1.0f * x[i] - x[i];
  y[i] = x[i];               // element to element
  y[i] += 1.0f;
  out[3 * i] = a;
  out[3 * i + 1] = b;
  out[3 * i + 2] = c;
}
JAX_MFA_INSTANTIATE_KERNEL("convert_half", convert, half)
JAX_MFA_INSTANTIATE_KERNEL("convert_bfloat", convert, bfloat)
kernel void fill_shuffles(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  const float data = float(lane), filling = 100.0f + float(lane);
  out[lane] = simd_shuffle_and_fill_up(data, filling, ushort(2), ushort(8));
  out[32 + lane] = simd_shuffle_and_fill_down(data, filling, ushort(3));
  out[64 + lane] = simd_shuffle_rotate_down(data, ushort(5));
}
"""


@pytest.mark.parametrize("dtype,name", [(np.float16, "half"), (ml_dtypes.bfloat16, "bfloat")])
def test_half_bfloat_element_conversions(dtype, name):
    lib = me.compile_source(CONVERSIONS_SRC.replace('#include <metal_stdlib>',
                                                    '#include <metal_stdlib>\n#include "jax_mfa_instantiate.h"'))
    x = np.linspace(-2, 2, 16).astype(dtype)
    out = np.zeros(48, np.float32)
    y = np.zeros(16, dtype)
    lib.dispatch(f"convert_{name}", grid=1, threads=16, buffers=[x, out, y])
    xf = x.astype(np.float32)
    np.testing.assert_allclose(out[0::3], 2 * xf)
    np.testing.assert_allclose(out[1::3], xf * xf, rtol=1e-6)
    # exp of a half element is a half; half * half rounds to half; + 1.0f * x - x is float.
    prod = (np.exp(xf).astype(dtype).astype(np.float32) * xf).astype(dtype).astype(np.float32)
    np.testing.assert_allclose(out[2::3], prod, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, (xf + 1).astype(dtype))


def test_fill_and_rotate_shuffles():
    lib = me.compile_source(CONVERSIONS_SRC.replace('#include <metal_stdlib>',
                                                    '#include <metal_stdlib>\n#include "jax_mfa_instantiate.h"'))
    out = np.zeros(96, np.float32)
    lib.dispatch("fill_shuffles", grid=1, threads=32, buffers=[out])
    lane = np.arange(32)
    j = lane % 8
    # Metal's example: up by 2 within segments of 8 -> lanes 0, 1 of each segment take filling[6], filling[7]
    np.testing.assert_array_equal(out[:32], np.where(j < 2, 100 + lane - 2 + 8, lane - 2))
    np.testing.assert_array_equal(out[32:64], np.where(lane + 3 >= 32, 100 + lane + 3 - 32, lane + 3))
    np.testing.assert_array_equal(out[64:], (lane + 5) % 32)


def test_worker_pool_option():
    lib = me.compile_source(FC_SRC)
    results = []
    for workers in (None, 0, 1, 3):
        out = np.zeros(256, np.float32)
        lib.dispatch("fc", grid=8, threads=32, buffers=[out], workers=workers,
                     function_constants={"use_extra": False, "repeat": 2, "gain": 0.5})
        results.append(out)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    with pytest.raises(ValueError, match="workers"):
        lib.dispatch("fc", grid=1, threads=1, buffers=[np.zeros(1, np.float32)], workers=-2)

#include <metal_stdlib>
#include "jax_mfa_instantiate.h"
using namespace metal;

struct Params {
  uint n;
  float scale;
};

template <typename T>
kernel void unary_math(device const T* x [[buffer(0)]],
                       device T* out [[buffer(1)]],
                       constant uint& n [[buffer(2)]],
                       uint gid [[thread_position_in_grid]]) {
  if (gid >= n) return;
  const T v = x[gid];
  // 8 outputs per input: exp, exp2, log2(|x|+1), tanh, sqrt(|x|), rsqrt(|x|+1), fma(v, v, 1), max/min/clamp mix
  out[8 * gid + 0] = exp(v);
  out[8 * gid + 1] = fast::exp2(v);
  out[8 * gid + 2] = precise::log2(abs(v) + T(1));
  out[8 * gid + 3] = tanh(v);
  out[8 * gid + 4] = sqrt(abs(v));
  out[8 * gid + 5] = rsqrt(abs(v) + T(1));
  out[8 * gid + 6] = fma(v, v, T(1));
  out[8 * gid + 7] = clamp(max(v, T(-1)), T(-2), min(T(0.5), T(3)));
}

JAX_MFA_INSTANTIATE_KERNEL("unary_math_float", unary_math, float)
JAX_MFA_INSTANTIATE_KERNEL("unary_math_half", unary_math, half)
JAX_MFA_INSTANTIATE_KERNEL("unary_math_bfloat", unary_math, bfloat)

// float4 vectors, swizzles, select, isnan/isinf, constants, a struct in constant memory.
kernel void vector_ops(device const float4* a [[buffer(0)]],
                       device float4* out [[buffer(1)]],
                       constant Params& p [[buffer(2)]],
                       uint2 gid [[thread_position_in_grid]],
                       uint2 grid_size [[threads_per_grid]]) {
  const uint i = gid.y * grid_size.x + gid.x;
  if (i >= p.n) return;
  float4 v = a[i];
  float4 r = v * p.scale + float4(1.0f, 2.0f, v.xy);
  r.xy = float2(r.yx);
  const bool4 bad = isnan(v) | isinf(v);
  r = select(r, float4(-INFINITY), bad);
  r.w = max(r.w, -numeric_limits<float>::max());
  half4 h = half4(r);
  out[i] = float4(h) + float4(0.0f);
}

// Half <-> float and bfloat <-> float conversions, bit patterns in and out.
kernel void convert_half(device const ushort* bits [[buffer(0)]],
                         device float* as_float [[buffer(1)]],
                         device const float* f [[buffer(2)]],
                         device half* to_half [[buffer(3)]],
                         device bfloat* to_bfloat [[buffer(4)]],
                         uint gid [[thread_position_in_grid]]) {
  as_float[gid] = float(as_type<half>(bits[gid]));
  to_half[gid] = half(f[gid]);
  to_bfloat[gid] = bfloat(f[gid]);
}

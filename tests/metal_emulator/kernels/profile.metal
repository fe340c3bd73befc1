// Kernels whose instruction profile is derived by hand in test_profile.py.
#include <metal_stdlib>
using namespace metal;

// Per threadgroup of 64 threads (2 simdgroups), each simdgroup:
//   device: 32 x 4 bytes read, 4 lanes x 4 bytes written; threadgroup: 128 bytes written, 128 read;
//   exp, exp2, tanh: 32 lane calls each; log: 4; one threadgroup barrier, one simdgroup barrier;
//   one reduction (simd_sum), one shuffle (simd_shuffle_xor).
kernel void profile_scalar(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                           threadgroup float* tg [[threadgroup(0)]],
                           uint tid [[thread_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]],
                           uint gid [[threadgroup_position_in_grid]]) {
  const float x = in[gid * 64 + tid];
  tg[tid] = exp(x);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float y = tg[63 - tid] + fast::exp2(x) + precise::tanh(x);
  y = simd_sum(y);
  y += simd_shuffle_xor(y, 1);
  simdgroup_barrier(mem_flags::mem_none);
  if (lane < 4) out[gid * 64 + tid] = log(abs(y) + 1.0f);
}

// One simdgroup: loads A (device) and B (threadgroup), three multiply-accumulates,
// stores to threadgroup and to device. half element math counts once per call
// (exp(half) is one call), a float4 exp counts four.
kernel void profile_matrix(device const half* a [[buffer(0)]], device half* c [[buffer(1)]],
                           device float* v [[buffer(2)]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup half b[64];
  threadgroup half scratch[64];
  b[lane] = half(lane);
  b[lane + 32] = half(1);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_half8x8 ma, mb, acc = make_filled_simdgroup_matrix<half, 8, 8>(0.0h);
  simdgroup_load(ma, a);
  simdgroup_load(mb, b);
  simdgroup_multiply_accumulate(acc, ma, mb, acc);
  simdgroup_multiply_accumulate(acc, ma, mb, acc);
  simdgroup_multiply(acc, acc, mb);
  simdgroup_store(acc, scratch);
  simdgroup_store(acc, c);
  const half h = exp(half(0.5h));
  const float4 e = exp(float4(float(h)));
  v[lane] = e.x + e.w;
}

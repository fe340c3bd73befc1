#include <metal_stdlib>
using namespace metal;

// 10 results per thread: shuffle, shuffle_xor, shuffle_up, shuffle_down,
// broadcast, sum, max, min, prefix exclusive / inclusive sum.
kernel void simd_ops(device const float* x [[buffer(0)]],
                     device float* out [[buffer(1)]],
                     uint gid [[thread_position_in_grid]],
                     ushort lane [[thread_index_in_simdgroup]]) {
  const float v = x[gid];
  device float* o = out + 10 * gid;
  o[0] = simd_shuffle(v, ushort((lane + 3) % 32));
  o[1] = simd_shuffle_xor(v, ushort(5));
  o[2] = simd_shuffle_up(v, ushort(2));
  o[3] = simd_shuffle_down(v, ushort(3));
  o[4] = simd_broadcast(v, ushort(7));
  o[5] = simd_sum(v);
  o[6] = simd_max(v);
  o[7] = simd_min(v);
  o[8] = simd_prefix_exclusive_sum(v);
  o[9] = simd_prefix_inclusive_sum(v);
}

// Reductions over a partial last simdgroup (threadgroup size not a multiple of 32).
kernel void simd_partial(device const int* x [[buffer(0)]],
                         device int* out [[buffer(1)]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nsg [[simdgroups_per_threadgroup]]) {
  const int v = x[tid];
  const int s = simd_sum(v);
  const int p = simd_prefix_inclusive_sum(v);
  out[2 * tid] = s;
  out[2 * tid + 1] = p + int(nsg) * 1000 + int(sg) * 100000;
}

// Row reductions on the simdgroup_matrix layout: a row is held by lanes that
// differ in bits 0 and 3 (shuffle_xor 1 then 8).
kernel void simd_vector_shuffle(device const half4* x [[buffer(0)]],
                                device half4* out [[buffer(1)]],
                                uint gid [[thread_position_in_grid]]) {
  half4 v = x[gid];
  v = v + simd_shuffle_xor(v, ushort(1));
  v = v + simd_shuffle_xor(v, ushort(8));
  out[gid] = v;
}

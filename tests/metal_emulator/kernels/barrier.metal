#include <metal_stdlib>
using namespace metal;

// Tree reduction of each threadgroup's slice in threadgroup memory (dynamic
// [[threadgroup(0)]] region), result per threadgroup.
kernel void block_sum(device const float* x [[buffer(0)]],
                      device float* out [[buffer(1)]],
                      threadgroup float* scratch [[threadgroup(0)]],
                      uint gid [[thread_position_in_grid]],
                      uint tid [[thread_index_in_threadgroup]],
                      uint tg [[threadgroup_position_in_grid]],
                      uint n [[threads_per_threadgroup]]) {
  scratch[tid] = x[gid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = n / 2; s > 0; s /= 2) {
    if (tid < s) scratch[tid] += scratch[tid + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) out[tg] = scratch[0];
}

// Reverse within a threadgroup through a kernel-scope threadgroup array, then
// a two-level sum: simd_sum per simdgroup, partials in threadgroup memory.
kernel void reverse_and_sum(device const float* x [[buffer(0)]],
                            device float* rev [[buffer(1)]],
                            device float* sums [[buffer(2)]],
                            uint2 tgid [[threadgroup_position_in_grid]],
                            uint2 tpos [[thread_position_in_threadgroup]],
                            uint2 tptg [[threads_per_threadgroup]],
                            uint2 ntg [[threadgroups_per_grid]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float buf[256];
  threadgroup float partial[8];
  const uint n = tptg.x * tptg.y;
  const uint group = tgid.y * ntg.x + tgid.x;
  const uint base = group * n;
  buf[tid] = x[base + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float v = buf[n - 1 - tid];
  rev[base + tid] = v;
  const float s = simd_sum(v);
  if (lane == 0) partial[sg] = s;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float t = 0.0f;
    for (uint i = 0; i < nsg; ++i) t += partial[i];
    sums[group] = t + float(tpos.x - tpos.x);
  }
}

// Threadgroup atomics record the order in which threads run between barriers.
kernel void ticket_order(device uint* tickets [[buffer(0)]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint gid [[thread_position_in_grid]]) {
  threadgroup atomic_uint counter;
  if (tid == 0) atomic_store_explicit(&counter, 0u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  tickets[gid] = atomic_fetch_add_explicit(&counter, 1u, memory_order_relaxed);
}

// Device atomics from many threadgroups into one counter (legal).
kernel void atomic_count(device atomic_uint* counter [[buffer(0)]],
                         device atomic_float* fsum [[buffer(1)]],
                         device const float* x [[buffer(2)]],
                         uint gid [[thread_position_in_grid]]) {
  atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  atomic_fetch_add_explicit(fsum, x[gid], memory_order_relaxed);
}

// simdgroup_barrier orders threadgroup memory between lanes of one simdgroup.
kernel void simd_exchange(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          threadgroup float* tg [[threadgroup(0)]],
                          uint tid [[thread_index_in_threadgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]],
                          uint lane [[thread_index_in_simdgroup]]) {
  tg[tid] = x[tid];
  simdgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = tg[sg * 32 + (lane ^ 1)];
}

#include <metal_stdlib>
using namespace metal;

// Planted bugs; each must be reported with the right error.

kernel void missing_barrier(device const float* x [[buffer(0)]],
                            device float* out [[buffer(1)]],
                            threadgroup float* tg [[threadgroup(0)]],
                            uint tid [[thread_index_in_threadgroup]],
                            uint n [[threads_per_threadgroup]]) {
  tg[tid] = x[tid];
  // BUG: no threadgroup_barrier here
  out[tid] = tg[(tid + 1) % n];
}

kernel void divergent_barrier(device float* out [[buffer(0)]],
                              threadgroup float* tg [[threadgroup(0)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  tg[tid] = float(tid);
  if (tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // BUG: not reached by all threads
  }
  out[tid] = tg[tid];
}

kernel void two_barriers(device float* out [[buffer(0)]],
                         uint tid [[thread_index_in_threadgroup]]) {
  if (tid % 2 == 0) {
    threadgroup_barrier(mem_flags::mem_none);
  } else {
    threadgroup_barrier(mem_flags::mem_none);  // BUG: a different barrier
  }
  out[tid] = 1.0f;
}

kernel void divergent_shuffle(device float* out [[buffer(0)]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint gid [[thread_position_in_grid]]) {
  float v = float(gid);
  if (lane < 16) v = simd_shuffle_xor(v, ushort(1));  // BUG: half of the simdgroup
  out[gid] = v;
}

kernel void tg_overflow(device float* out [[buffer(0)]],
                        threadgroup float* tg [[threadgroup(0)]],
                        uint tid [[thread_index_in_threadgroup]]) {
  tg[tid + 1] = 1.0f;  // BUG: the last thread writes past the region
  out[tid] = 0.0f;
}

kernel void tg_static_too_big(device float* out [[buffer(0)]],
                              uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float big[9000];  // BUG: 36000 bytes > 32 KiB
  big[tid] = 1.0f;
  out[tid] = 0.0f;
}

kernel void oob_read(device const float* x [[buffer(0)]],
                     device float* out [[buffer(1)]],
                     uint gid [[thread_position_in_grid]]) {
  out[gid] = x[gid + 1];  // BUG: reads one past the end
}

kernel void oob_write(device const float* x [[buffer(0)]],
                      device float* out [[buffer(1)]],
                      uint gid [[thread_position_in_grid]]) {
  out[gid + 1] = x[gid];  // BUG: writes one past the end
}

kernel void write_conflict(device float* out [[buffer(0)]],
                           uint tid [[thread_index_in_threadgroup]],
                           uint tg [[threadgroup_position_in_grid]]) {
  out[tid] = float(tg);  // BUG: every threadgroup writes the same elements
}

kernel void simd_store_race(device float* out [[buffer(0)]],
                            threadgroup float* tg [[threadgroup(0)]],
                            uint tid [[thread_index_in_threadgroup]]) {
  simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
  simdgroup_store(m, tg, 8);  // BUG: both simdgroups store the same 8x8 tile
  out[tid] = 0.0f;
}

kernel void device_race_in_group(device float* out [[buffer(0)]],
                                 uint tid [[thread_index_in_threadgroup]]) {
  out[tid] = float(tid);
  // BUG: no threadgroup_barrier(mem_flags::mem_device) before reading a neighbour's element
  out[32 + tid] = out[(tid + 1) % 32];
}

kernel void device_exchange_ok(device float* out [[buffer(0)]],
                               uint tid [[thread_index_in_threadgroup]],
                               uint tg [[threadgroup_position_in_grid]]) {
  out[64 * tg + tid] = float(tid);
  threadgroup_barrier(mem_flags::mem_device);
  out[64 * tg + 32 + tid] = out[64 * tg + (tid + 1) % 32];
}

kernel void read_other_group(device float* out [[buffer(0)]],
                             uint tid [[thread_index_in_threadgroup]],
                             uint tg [[threadgroup_position_in_grid]]) {
  out[32 * tg + tid] = 1.0f;
  if (tg > 0) out[32 * tg + tid] = out[32 * (tg - 1) + tid] + 1.0f;  // BUG: reads another group's output
}

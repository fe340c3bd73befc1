#include <metal_stdlib>
#include "jax_mfa_instantiate.h"
using namespace metal;

// One 8x8 product C = A * B by one simdgroup; also writes each lane's
// thread_elements() of A and C (2 per lane) to check the lane layout.
template <typename T>
kernel void mma8x8(device const T* A [[buffer(0)]],
                   device const T* B [[buffer(1)]],
                   device float* C [[buffer(2)]],
                   device float* elems [[buffer(3)]],
                   ushort lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<T, 8, 8> a, b;
  simdgroup_load(a, A);
  simdgroup_load(b, B, 8);
  simdgroup_float8x8 c = make_filled_simdgroup_matrix<float, 8, 8>(0.5f);
  simdgroup_multiply_accumulate(c, a, b, c);
  simdgroup_store(c, C);
  const vec<T, 2> ea = a.thread_elements();
  const float2 ec = c.thread_elements();
  elems[4 * lane + 0] = float(ea[0]);
  elems[4 * lane + 1] = float(ea[1]);
  elems[4 * lane + 2] = ec.x;
  elems[4 * lane + 3] = ec.y;
}
JAX_MFA_INSTANTIATE_KERNEL("mma8x8_float", mma8x8, float)
JAX_MFA_INSTANTIATE_KERNEL("mma8x8_half", mma8x8, half)
JAX_MFA_INSTANTIATE_KERNEL("mma8x8_bfloat", mma8x8, bfloat)

// C = A * B with 4 simdgroups per threadgroup, a 32x32 tile of C per
// threadgroup. A is staged in threadgroup memory ([[threadgroup(0)]], TM x TK),
// B is given transposed (Bt, N x K) and loaded from device memory with
// transpose = true, C goes through a kernel-scope threadgroup array.
constant constexpr uint TM = 32, TN = 32, TK = 32;

kernel void matmul_tiled(device const float* A [[buffer(0)]],
                         device const float* Bt [[buffer(1)]],
                         device float* C [[buffer(2)]],
                         constant uint3& dims [[buffer(3)]],
                         threadgroup float* As [[threadgroup(0)]],
                         uint3 tgid [[threadgroup_position_in_grid]],
                         uint tid [[thread_index_in_threadgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]],
                         uint nthreads [[threads_per_threadgroup]]) {
  threadgroup float Cs[TM * TN];
  const uint M = dims.x, N = dims.y, K = dims.z;
  const uint row0 = tgid.y * TM, col0 = tgid.x * TN;
  const uint sr = (sg / 2) * 16, sc = (sg % 2) * 16;
  simdgroup_float8x8 acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k0 = 0; k0 < K; k0 += TK) {
    for (uint i = tid; i < TM * TK; i += nthreads) As[i] = A[(row0 + i / TK) * K + k0 + i % TK];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < TK; kk += 8) {
      simdgroup_float8x8 a[2], b[2];
      for (int i = 0; i < 2; ++i) simdgroup_load(a[i], As, TK, ulong2(kk, sr + 8 * i));
      for (int j = 0; j < 2; ++j) simdgroup_load(b[j], Bt, K, ulong2(k0 + kk, col0 + sc + 8 * j), true);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) simdgroup_store(acc[i][j], Cs, TN, ulong2(sc + 8 * j, sr + 8 * i));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < TM * TN; i += nthreads) C[(row0 + i / TN) * N + col0 + i % TN] = Cs[i];
  (void)M;
}

// C = A * B straight from/to device memory with origins; C stored transposed
// when `transpose_c` is set (Ct = C^T).
kernel void matmul_device(device const half* A [[buffer(0)]],
                          device const half* B [[buffer(1)]],
                          device float* C [[buffer(2)]],
                          constant uint4& dims [[buffer(3)]],
                          uint2 tgid [[threadgroup_position_in_grid]]) {
  const uint N = dims.y, K = dims.z;
  const bool transpose_c = dims.w != 0;
  const uint r0 = tgid.y * 8, c0 = tgid.x * 8;
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k = 0; k < K; k += 8) {
    simdgroup_half8x8 a, b;
    simdgroup_load(a, A, K, ulong2(k, r0));
    simdgroup_load(b, B, N, ulong2(c0, k));
    simdgroup_multiply_accumulate(acc, a, b, acc);
  }
  if (transpose_c) simdgroup_store(acc, C, dims.x, ulong2(r0, c0), true);
  else simdgroup_store(acc, C, N, ulong2(c0, r0));
}

// The 16-bit operand path of metal/attention_kernels.h: float values set as
// the elements of 16-bit matrices (rounded to T), P (float) times a 16-bit
// matrix, and products accumulated into a float matrix (init `c0`).
// C = c0 + round(A) round(B) (the 16-bit product); D = c0 + A round(B) (mixed).
template <typename T>
kernel void mma_mixed_precision(device const float* A [[buffer(0)]],
                                device const float* B [[buffer(1)]],
                                device float* C [[buffer(2)]],
                                device float* D [[buffer(3)]],
                                constant float& c0 [[buffer(4)]],
                                ushort lane [[thread_index_in_simdgroup]]) {
  const int r = (lane / 16) * 4 + (lane / 2) % 4, c = ((lane / 8) % 2) * 4 + (lane % 2) * 2;
  simdgroup_matrix<T, 8, 8> a, b;
  simdgroup_float8x8 af;
  for (int e = 0; e < 2; ++e) {
    a.thread_elements()[e] = T(A[r * 8 + c + e]);
    b.thread_elements()[e] = T(B[r * 8 + c + e]);
    af.thread_elements()[e] = A[r * 8 + c + e];
  }
  simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(c0);
  simdgroup_float8x8 mixed = acc;
  simdgroup_multiply_accumulate(acc, a, b, acc);
  simdgroup_multiply_accumulate(mixed, af, b, mixed);
  simdgroup_store(acc, C);
  simdgroup_store(mixed, D);
}
JAX_MFA_INSTANTIATE_KERNEL("mma_mixed_precision_half", mma_mixed_precision, half)
JAX_MFA_INSTANTIATE_KERNEL("mma_mixed_precision_bfloat", mma_mixed_precision, bfloat)

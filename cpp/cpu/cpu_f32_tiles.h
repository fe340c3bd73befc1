// float32 tile products of the CPU kernels on AVX-512, for the small GEMMs
// of attention tiles (256 x 256 x 64 and the like), where OpenBLAS ran at
// 60-86 GFLOP/s per thread on the AMX Xeon: it re-packs both operands on
// every call. Here A is read in place (its elements broadcast) and B either
// in place (rows contiguous along N) or packed once per call in 16-column
// panels (K^T), so a tile product only streams its operands through the
// register-blocked loop. Chosen at run time like cpu_simd.h; elsewhere the
// kernels keep cpu::gemm (OpenBLAS / Accelerate).
#pragma once

#include <cstdint>

namespace jax_mfa {
namespace cpu {

// True when f32_gemm may be called: the CPU has AVX-512F and
// JAX_MFA_F32_TILES (read on every call, for comparisons and tests) is not
// "blas".
bool f32_tiles_available();

// C[M x N] = alpha * A B (+ C when accumulate), float32, single-threaded.
// A(i, k) = A[i * a_row + k * a_col]: a_col = 1 for row-major A, a_row = 1
// for A^T read in place. B(k, n) = B[(n / 16) * b_panel + k * b_row + n % 16]:
// row-major B has b_panel = 16, b_row = its row stride; pack_panels output
// has b_row = 16, b_panel = 16 * its K. B is read only at n < N, except in
// whole panels (b_row == 16), which must be readable up to the next multiple
// of 16 columns (pack_panels pads them). C's columns past N are never written.
void f32_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row,
              int64_t a_col, const float* B, int64_t b_row, int64_t b_panel, bool accumulate,
              float* C, int64_t ldc);

// The panels of B = src^T for f32_gemm: src has n rows of K floats (row
// stride src_stride); dst[(j / 16) * 16 * K + k * 16 + j % 16] = src[j][k],
// zero for j in [n, ceil(n / 16) * 16). dst holds ceil(n / 16) * 16 * K floats.
void pack_panels(const float* src, int64_t src_stride, int64_t n, int64_t K, float* dst);

}  // namespace cpu
}  // namespace jax_mfa

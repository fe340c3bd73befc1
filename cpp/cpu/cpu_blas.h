// Single-threaded GEMM for the CPU kernels' tiles where cpu_f32_tiles.h does
// not apply: no AVX-512, float64, JAX_MFA_F32_TILES=blas, and the products
// against packed K^T / V^T when under 32 stacked query rows would reuse them.
//
// Uses OpenBLAS from the scipy-openblas32 wheel (loaded at run time by path,
// its own thread pool set to one thread: the kernels parallelise themselves),
// Apple Accelerate on macOS, and a portable loop nest when neither is there.
#pragma once

#include <cstdint>

namespace jax_mfa {
namespace cpu {

// Row-major C[M x N] = alpha * op(A)[M x K] * op(B)[K x N] + beta * C, with
// op(X) = X or X^T (trans_*), leading dimensions in elements.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
          const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C,
          int64_t ldc);

// Where the tile products come from: a library path, "Accelerate", or
// "built-in loops" (slow: no BLAS found).
const char* blas_description();

}  // namespace cpu
}  // namespace jax_mfa

// bfloat16 tile products on the CPU's bfloat16 dot-product instruction
// (AVX512-BF16 VDPBF16PS: each float lane accumulates the products of a pair
// of bfloat16), chosen at run time like cpu_simd.h. Accumulation is in float.
//
// Hand-written because no packaged library does this for us (measured, see
// benchmarks/RESULTS.md): the oneDNN wheels on PyPI (`onednn` 2026.x, oneDNN
// 3.13) are SYCL builds with the micro-kernel API compiled out and no CPU
// engine without a SYCL CPU device; MKL's bfloat16 GEMM runs at its SGEMM rate
// on AMD Zen 4; OpenBLAS in scipy-openblas32 has no sbgemm.
#pragma once

#include <cstdint>

namespace jax_mfa {
namespace cpu {

// True when the CPU has AVX512-BF16 and JAX_MFA_BF16_DOT is not "0" (read on
// every call, so tests can exercise both paths in one process).
bool bf16_dot_available();

// "Pair layout" of a K x N operand B: word (k / 2) * ld + n holds B[k][n] in
// its low half and B[k + 1][n] in its high half (k even); for odd K the last
// high halves are 0. Operand A is plain row-major bfloat16 with rows padded to
// an even length with zeros, read as `pairs` = ceil(K / 2) words per row.

// Packs B = src^T where src has N rows of K bfloat16 (row stride in elements),
// e.g. the keys of a tile for Q K^T.
void pack_pairs_transposed(const uint16_t* src, int64_t src_stride, int64_t N, int64_t K,
                           uint32_t* dst, int64_t ld);
// Packs B = src, K rows of N bfloat16 (row stride in elements), e.g. values.
void pack_pairs(const uint16_t* src, int64_t src_stride, int64_t K, int64_t N, uint32_t* dst,
                int64_t ld);

// C[M x N] = alpha * A B (+ C when accumulate). A: M rows of `pairs` words,
// row stride lda words; B in pair layout, row stride ldb words; C float, row
// stride ldc. Only call when bf16_dot_available().
void bf16_gemm(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A, int64_t lda,
               const uint32_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace jax_mfa

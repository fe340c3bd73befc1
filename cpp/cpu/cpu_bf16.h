// bfloat16 tile products on the CPU's bfloat16 matrix or dot-product
// instructions, chosen at run time like cpu_simd.h: AMX-BF16 (TDPBF16PS on
// 16 x 16 float tiles, Intel Sapphire Rapids and later) where the CPU and OS
// allow it, else AVX512-BF16 (VDPBF16PS: each float lane accumulates the
// products of a pair of bfloat16). Accumulation is in float either way.
//
// Hand-written because no packaged library does this for us (measured, see
// benchmarks/RESULTS.md; re-checked 2026-11-22): the oneDNN wheels on PyPI
// (`onednn` 2025.0-2026.1, oneDNN 3.6-3.13) are SYCL builds that export no
// public `dnnl_brgemm_*` micro-kernel API (only internal dnnl::impl C++
// symbols) and have no CPU engine without a SYCL CPU device; MKL's bfloat16
// GEMM runs at its SGEMM rate on AMD Zen 4; OpenBLAS in scipy-openblas32 and
// in cmeel-openblas 0.3.31 has no sbgemm function (cmeel's exports only the
// sbgemm_p/q/r blocking variables).
#pragma once

#include <cstdint>

namespace jax_mfa {
namespace cpu {

// True when the CPU (and OS) can run AVX512-BF16 code.
bool cpu_has_avx512_bf16();
// True when the CPU has AMX-TILE and AMX-BF16 and (Linux) the kernel granted
// this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, asked once).
bool cpu_has_amx_bf16();

// The instruction bf16_gemm uses: JAX_MFA_BF16_DOT (read on every call, so
// tests exercise every path in one process) = "0": none (the kernels take
// their portable float path); "avx512": AVX512-BF16 even where AMX exists;
// unset or anything else: the best the CPU has.
enum class Bf16Dot { None, Avx512, Amx };
Bf16Dot bf16_dot_kind();
inline bool bf16_dot_available() { return bf16_dot_kind() != Bf16Dot::None; }
// Whether float16 forwards run on the bfloat16 instructions through hi/lo
// splits (Q K^T as four products, P V as three: attention_cpu.cc). Opt-in:
// JAX_MFA_F16_SPLIT=1 (read on every call) wherever bf16_dot_available(); off
// by default, because it was not faster than the float path (RESULTS.md).
bool f16_split_available();

// "Pair layout" of a K x N operand B: word (k / 2) * ld + n holds B[k][n] in
// its low half and B[k + 1][n] in its high half (k even); for odd K the last
// high halves are 0. Operand A is plain row-major bfloat16 with rows padded to
// an even length with zeros, read as `pairs` = ceil(K / 2) words per row.

// Packing: a word holds a pair of bfloat16 (the even index in the low half,
// a missing odd one as 0). Pairs taken along each row of src (rows x K):
// word (row, kp) = (src[row][2kp], src[row][2kp+1]) goes to
// dst[kp * pair_stride + row * row_stride]: an A operand with
// (pair_stride, row_stride) = (1, ld), a B operand src^T (keys as rows, for
// Q K^T) with (ld, 1).
void pack_pairs_in_rows(const uint16_t* src, int64_t src_stride, int64_t rows, int64_t K,
                        uint32_t* dst, int64_t pair_stride, int64_t row_stride);
// Pairs taken across rows of src (K x cols): word (kp, col) = (src[2kp][col],
// src[2kp+1][col]) goes to dst[kp * pair_stride + col * col_stride]: a B
// operand (values for P V) with (ld, 1), an A operand src^T with (1, ld).
void pack_pairs_across_rows(const uint16_t* src, int64_t src_stride, int64_t K, int64_t cols,
                            uint32_t* dst, int64_t pair_stride, int64_t col_stride);

// The same from float rows, rounded to nearest even (only where
// bf16_dot_available()): an A operand (pairs in rows, dst row stride ld) and
// a B operand (pairs across rows, dst pair stride ld).
void float_to_pairs_in_rows(const float* src, int64_t src_stride, int64_t rows, int64_t K,
                            uint32_t* dst, int64_t ld);
void float_to_pairs_across_rows(const float* src, int64_t src_stride, int64_t K, int64_t cols,
                                uint32_t* dst, int64_t ld);

// float16 on the bfloat16 instructions: x = hi + lo, hi = bfloat16(x),
// lo = bfloat16(x - hi). Exact for every finite float16 (11 significant bits
// = 8 + 3, exponents inside bfloat16's range), so the four products of the
// parts give a float16 product exactly (lo*lo' alone is up to 2^-16 of it);
// for a float x the parts keep 16 significant bits. lo is 0 where x is infinite (NaN stays NaN).
// Contiguous runs of n values; only where bf16_dot_available().
void half_to_bf16_hi_lo(const uint16_t* src, int64_t n, uint16_t* hi, uint16_t* lo);
void float_to_bf16_hi_lo(const float* src, int64_t n, uint16_t* hi, uint16_t* lo);

// C[M x N] = alpha * A B (+ C when accumulate). A: M rows of `pairs` words,
// row stride lda words; B in pair layout, row stride ldb words; C float, row
// stride ldc. Only call when bf16_dot_available(); runs on the instruction
// bf16_dot_kind() names.
void bf16_gemm(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A, int64_t lda,
               const uint32_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);
// C = alpha * sum over t < terms of A[t] B[t] (+ C), the same layouts for
// every term: on AMX one accumulation in the tiles (the float16 splits).
void bf16_gemm_sum(int64_t M, int64_t N, int64_t pairs, float alpha, int terms,
                   const uint32_t* const* A, int64_t lda, const uint32_t* const* B, int64_t ldb,
                   bool accumulate, float* C, int64_t ldc);

// Tile layout (AMX only: bf16_b_tiles_used()): a B operand copied once into
// the 16 x 16-word tiles the tile unit loads, so that products reusing it
// (every query block of an attention call against the same keys) skip the
// per-call copy of amx_gemm. Tile (kt, nt) (pairs 16 kt.., columns 16 nt..)
// lies at dst + (kt + nt * b_stride) * 256, zero-padded past `pairs` and N;
// b_stride >= ceil(pairs / 16), the tiles of a column tile along K.
// JAX_MFA_AMX_TILED_B=0 (read on every call) turns it off, for comparisons.
bool bf16_b_tiles_used();
void pack_b_tiles(const uint32_t* B, int64_t ldb, int64_t pairs, int64_t N, uint32_t* dst,
                  int64_t b_stride);
// float_to_pairs_across_rows (K x cols floats) written straight in that tile
// layout, zero-padded to whole tiles: the same words as pack_b_tiles of its
// pair layout, without the copy in between (the backward's P and dS). dst on
// a 64-byte boundary; only where bf16_b_tiles_used().
void float_to_b_tiles(const float* src, int64_t src_stride, int64_t K, int64_t cols,
                      uint32_t* dst, int64_t b_stride);
// bf16_gemm with B in tile layout from tile (kt0, nt0) of a pack_b_tiles
// operand: Bt = dst + (kt0 + nt0 * b_stride) * 256. Products read
// ceil(pairs / 16) tiles along K and ceil(N / 16) along N; C's columns past
// N are never written. A is read in place where M and pairs are multiples of
// 16 (its rows then hold whole tiles), else copied into tiles first.
void bf16_gemm_b_tiles(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A,
                       int64_t lda, const uint32_t* Bt, int64_t b_stride, bool accumulate,
                       float* C, int64_t ldc);

// One step of a software-pipelined product (attention_cpu.cc's strips): the
// 16 x 32 block C[0..16) x [0..32) (+)= A B, A 16 rows in place (k_tiles * 16
// pairs each, rows lda words apart), B two column tiles of a pack_b_tiles
// operand (Bt, b_stride as bf16_gemm_b_tiles), alpha 1. Only on AMX, inside
// an AmxTileScope.
void bf16_strip_block(int64_t k_tiles, const uint32_t* A, int64_t lda, const uint32_t* Bt,
                      int64_t b_stride, bool accumulate, float* C, int64_t ldc);

// Keeps the calling thread's AMX tiles configured for the products run in its
// lifetime (a task's many small products), instead of configuring and
// releasing them in every product; releases them at its end, so that other
// code on the thread finds them free. Nothing where `on` is false or the
// products do not run on AMX. Scopes do not nest (an inner one does nothing).
class AmxTileScope {
 public:
  explicit AmxTileScope(bool on);
  ~AmxTileScope();
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;

 private:
  bool held_ = false;
};

// Profiling (JAX_MFA_PROFILE): time stamp counter cycles the AMX products
// spent copying operands into tiles and in the tile products, summed over
// threads since the last take.
struct Bf16Cycles {
  int64_t pack = 0, tiles = 0;
};
void bf16_count_cycles(bool on);
Bf16Cycles bf16_take_cycles();

}  // namespace cpu
}  // namespace jax_mfa

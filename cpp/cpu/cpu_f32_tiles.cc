#include "cpu/cpu_f32_tiles.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#include "cpu/cpu_x86.h"

namespace jax_mfa {
namespace cpu {
namespace {

// Element (k, n) of f32_gemm's B.
inline const float* b_at(const float* B, int64_t b_row, int64_t b_panel, int64_t k, int64_t n) {
  return B + (n / 16) * b_panel + k * b_row + n % 16;
}

// Portable version of the same product (only reached where
// f32_tiles_available() is false and a caller asks anyway).
void gemm_loops(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row,
                int64_t a_col, const float* B, int64_t b_row, int64_t b_panel, bool accumulate,
                float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n) {
      float s = 0;
      for (int64_t k = 0; k < K; ++k) s += A[i * a_row + k * a_col] * *b_at(B, b_row, b_panel, k, n);
      C[i * ldc + n] = alpha * s + (accumulate ? C[i * ldc + n] : 0.0f);
    }
}

#ifdef JAX_MFA_X86
#define AVX512 __attribute__((target("avx512f,avx2,fma")))

// One register block: MR rows x NV vectors of 16 columns, MR * NV <= 24
// accumulators (of 32 zmm registers), all of K at once. The last vector is
// loaded and stored under `last` (the columns left of N), so B rows may end
// at N and C past N is untouched.
template <int MR, int NV>
AVX512 void block(int64_t K, float alpha, const float* A, int64_t a_row, int64_t a_col,
                  const float* B, int64_t b_row, int64_t b_panel, __mmask16 last, bool accumulate,
                  float* C, int64_t ldc) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const float* p = B + v * b_panel + k * b_row;
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, p) : _mm512_loadu_ps(p);
    }
    const float* a = A + k * a_col;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 x = _mm512_set1_ps(a[i * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_ps(x, b[v], c[i][v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* p = C + i * ldc + v * 16;
      const __mmask16 m = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 r = _mm512_mul_ps(al, c[i][v]);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, p));
      _mm512_mask_storeu_ps(p, m, r);
    }
}

// Rows per block: 6 x 4 vectors = 24 accumulators, 4 B loads and 6
// broadcasts per 24 FMAs of each k.
constexpr int kRows = 6, kVectors = 4;
using BlockFn = void (*)(int64_t, float, const float*, int64_t, int64_t, const float*, int64_t,
                         int64_t, __mmask16, bool, float*, int64_t);

template <int MR>
constexpr std::array<BlockFn, kVectors> blocks_of_rows() {
  return {block<MR, 1>, block<MR, 2>, block<MR, 3>, block<MR, 4>};
}
const std::array<BlockFn, kVectors> kBlocks[kRows] = {
    blocks_of_rows<1>(), blocks_of_rows<2>(), blocks_of_rows<3>(),
    blocks_of_rows<4>(), blocks_of_rows<5>(), blocks_of_rows<6>()};

// Columns in groups of 64 (outer: their B panels, K x 64 floats, stay in L1
// while all rows of A pass), rows in groups of 6.
AVX512 void gemm_avx512(int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                        int64_t a_row, int64_t a_col, const float* B, int64_t b_row,
                        int64_t b_panel, bool accumulate, float* C, int64_t ldc) {
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kVectors) {
    const int64_t nv = std::min<int64_t>(kVectors, (N - n0 + 15) / 16);
    // 1..16 columns in the last vector of this group
    const int64_t tail = std::min<int64_t>(16, N - n0 - 16 * (nv - 1));
    const __mmask16 last = __mmask16((1u << tail) - 1);
    const float* Bn = B + (n0 / 16) * b_panel;
    for (int64_t i0 = 0; i0 < M; i0 += kRows) {
      const int64_t mr = std::min<int64_t>(kRows, M - i0);
      kBlocks[mr - 1][nv - 1](K, alpha, A + i0 * a_row, a_row, a_col, Bn, b_row, b_panel, last,
                              accumulate, C + i0 * ldc + n0, ldc);
    }
  }
}

// 16 x 16 floats transposed in registers (unpacks within 128-bit lanes,
// then lane shuffles): x[j] lane k becomes x[k] lane j.
AVX512 inline void transpose16(__m512 x[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[i + h]), b = _mm512_castps_pd(t[i + h + 2]);
      x[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      x[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(x[i + j], x[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(x[i + j], x[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    x[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    x[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// pack_panels on AVX-512: 16 keys x 16 features per transpose.
AVX512 void pack_panels_avx512(const float* src, int64_t src_stride, int64_t n, int64_t K,
                               float* dst) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    float* panel = dst + (j0 / 16) * 16 * K;
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kw = std::min<int64_t>(16, K - k0);
      const __mmask16 m = __mmask16((1u << kw) - 1);
      __m512 x[16];
      for (int j = 0; j < 16; ++j)
        x[j] = j < w ? _mm512_maskz_loadu_ps(m, src + (j0 + j) * src_stride + k0)
                     : _mm512_setzero_ps();
      transpose16(x);
      for (int k = 0; k < kw; ++k) _mm512_storeu_ps(panel + (k0 + k) * 16, x[k]);
    }
  }
}

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}
#endif

}  // namespace

bool f32_tiles_available() {
#ifdef JAX_MFA_X86
  const char* env = std::getenv("JAX_MFA_F32_TILES");
  return cpu_has_avx512f() && !(env && std::strcmp(env, "blas") == 0);
#else
  return false;
#endif
}

void f32_gemm(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t a_row,
              int64_t a_col, const float* B, int64_t b_row, int64_t b_panel, bool accumulate,
              float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#ifdef JAX_MFA_X86
  if (cpu_has_avx512f())
    return gemm_avx512(M, N, K, alpha, A, a_row, a_col, B, b_row, b_panel, accumulate, C, ldc);
#endif
  gemm_loops(M, N, K, alpha, A, a_row, a_col, B, b_row, b_panel, accumulate, C, ldc);
}

void pack_panels(const float* src, int64_t src_stride, int64_t n, int64_t K, float* dst) {
#ifdef JAX_MFA_X86
  if (cpu_has_avx512f()) return pack_panels_avx512(src, src_stride, n, K, dst);
#endif
  // Row by row: src rows are read contiguously (16 rows a power-of-two apart
  // read column by column would share cache sets).
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t w = std::min<int64_t>(16, n - j0);
    float* panel = dst + (j0 / 16) * 16 * K;
    for (int64_t j = 0; j < w; ++j) {
      const float* row = src + (j0 + j) * src_stride;
      for (int64_t k = 0; k < K; ++k) panel[k * 16 + j] = row[k];
    }
    for (int64_t j = w; j < 16; ++j)
      for (int64_t k = 0; k < K; ++k) panel[k * 16 + j] = 0.0f;
  }
}

}  // namespace cpu
}  // namespace jax_mfa

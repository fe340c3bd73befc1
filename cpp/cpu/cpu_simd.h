// Vectorised row operations of the softmax, chosen at run time for the CPU
// (AVX-512, AVX2+FMA, or portable scalar code), plus float16/bfloat16 ->
// float conversion. Nothing here needs -m flags: the vector versions carry
// target attributes and are only called after a CPU feature check.
#pragma once

#include <cstdint>

namespace jax_mfa {
namespace cpu {

struct RowOps {
  // max over x[0..n); -inf for n == 0.
  float (*max)(const float* x, int64_t n);
  // x[i] = exp(x[i] - shift) (exactly 0 where x[i] - shift < -87.3, e.g. -inf);
  // returns the sum of the new values.
  float (*exp_sum)(float* x, int64_t n, float shift);
  // x[i] = exp(x[i] * mul - shift) (one rounding of the argument), same
  // rule, no sum: `mul` a softmax scale not yet applied to the scores.
  void (*exp)(float* x, int64_t n, float mul, float shift);
  // dp[i] = p[i] * (dp[i] - delta)
  void (*ds)(const float* p, float* dp, int64_t n, float delta);
  // y[i] *= a
  void (*scale)(float* y, int64_t n, float a);
  // Storage conversions.
  void (*half_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*bfloat_to_float)(const uint16_t* src, float* dst, int64_t n);
  // dst[i] = bfloat16(exp(x[i] * mul - shift)) (0 below -87.3 as in exp),
  // x unchanged; returns the sum of the float values (relative error ~2e-7:
  // P itself is rounded to bfloat16). Only where the CPU has AVX512-BF16
  // (nullptr otherwise): the softmax of the bfloat16 dot-product path, `mul`
  // its softmax scale where the scores are not scaled yet.
  float (*exp_sum_to_bfloat)(const float* x, uint16_t* dst, int64_t n, float mul, float shift);
  // dst[i] = round-to-nearest-even(src[i] * scale), as float_to_*_bits do.
  void (*float_to_half)(const float* src, uint16_t* dst, int64_t n, float scale);
  void (*float_to_bfloat)(const float* src, uint16_t* dst, int64_t n, float scale);
  const char* name;
};

// The best implementation for this CPU (JAX_MFA_SIMD=scalar|avx2|avx512 overrides).
const RowOps& row_ops();

}  // namespace cpu
}  // namespace jax_mfa

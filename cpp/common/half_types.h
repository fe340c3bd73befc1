// IEEE binary16 ("half") and bfloat16 conversions, round-to-nearest-even.
//
// One implementation shared by the CPU kernels and the Metal emulator's
// `half`/`bfloat` types, so both round exactly as Metal and XLA do.
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_mfa {

// constexpr (through __builtin_bit_cast, gcc >= 11 / clang >= 9) so that the
// Metal emulator's half/bfloat constants can be evaluated at compile time.
constexpr uint32_t float_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

constexpr float bits_float(uint32_t u) { return __builtin_bit_cast(float, u); }

constexpr float bfloat_bits_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

constexpr uint16_t float_to_bfloat_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(u >> 16);
}

constexpr float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: value = man * 2^-24, exact in float.
  const float mag = float(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

constexpr uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN (NaN stays quiet)
    return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: overflow
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): round abs * 2^24 to an integer, ties to even.
    // Adding 0.5f (=2^-1) aligns the binary point; float addition rounds RNE.
    const float scaled = bits_float(abs) + 0.5f;
    return uint16_t(sign | uint16_t(float_bits(scaled) - float_bits(0.5f)));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits RNE.
  uint32_t r = abs - 0x38000000u;  // exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}

}  // namespace jax_mfa

// The attention-dropout generator, shared by the CPU kernels (C++), the Metal
// kernels (Metal Shading Language) and the Metal emulator: one definition.
// jax_mfa/_philox.py implements the same function in JAX for the "xla"
// paths; tests/test_segments_sinks_dropout.py checks all of them against
// Random123's published Philox4x32-10 known-answer vectors and each other.
//
// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3",
// SC11): a keyed bijection of a 128-bit counter. Dropout keys it with two
// 32-bit words of the JAX PRNG key and uses the counter
//   (key // 4, query, head, batch)
// taking output word key % 4, so four neighbouring keys share one evaluation.
// Entry (b, n, i, j) is dropped iff that word < threshold, where threshold =
// round(rate * 2^32) (see mfa_dropout_threshold); kept entries are scaled by
// 1 / (1 - rate).
//
// The indices are those of the whole (unsharded) problem. A kernel call sees
// a part of it (a device's heads, a ring block's queries and keys), so each
// batch row of the dropout seed operand carries, besides the key words, the
// counter's origin: the global index of the row's batch and of the call's
// first head, query and key (MfaDropoutSeed). A local entry (n, i, j) draws
// the word of (batch, head + n, query + i, key + j).
#ifndef JAX_MFA_METAL_DROPOUT_PHILOX_H
#define JAX_MFA_METAL_DROPOUT_PHILOX_H

#if defined(__METAL_VERSION__)
typedef uint mfa_u32;
inline mfa_u32 mfa_mulhi(mfa_u32 a, mfa_u32 b) { return mulhi(a, b); }
#else
#include <cstdint>
typedef uint32_t mfa_u32;
inline mfa_u32 mfa_mulhi(mfa_u32 a, mfa_u32 b) {
  return mfa_u32((uint64_t(a) * uint64_t(b)) >> 32);
}
#endif

// The words of one batch row of the dropout seed operand ((B, 6) uint32).
enum MfaDropoutSeed {
  MFA_SEED_KEY0, MFA_SEED_KEY1,  // the Philox key
  MFA_SEED_BATCH, MFA_SEED_HEAD, MFA_SEED_QUERY, MFA_SEED_KEY,  // the counter origin
  MFA_DROPOUT_SEED_WORDS
};

struct MfaPhilox4 {
  mfa_u32 x, y, z, w;
};

// Philox4x32 with 10 rounds: multipliers and Weyl key increments as published.
inline MfaPhilox4 mfa_philox4x32_10(MfaPhilox4 c, mfa_u32 k0, mfa_u32 k1) {
  for (int round = 0; round < 10; ++round) {
    const mfa_u32 hi0 = mfa_mulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
    const mfa_u32 hi1 = mfa_mulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
    MfaPhilox4 n;
    n.x = hi1 ^ c.y ^ k0;
    n.y = lo1;
    n.z = hi0 ^ c.w ^ k1;
    n.w = lo0;
    c = n;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The four words of keys 4 * (key / 4) ... + 3 of (batch, head, query).
inline MfaPhilox4 mfa_dropout_words(mfa_u32 k0, mfa_u32 k1, mfa_u32 batch, mfa_u32 head,
                                    mfa_u32 query, mfa_u32 key) {
  MfaPhilox4 c;
  c.x = key >> 2;
  c.y = query;
  c.z = head;
  c.w = batch;
  return mfa_philox4x32_10(c, k0, k1);
}

// The random word of attention entry (batch, head, query, key).
inline mfa_u32 mfa_dropout_word(mfa_u32 k0, mfa_u32 k1, mfa_u32 batch, mfa_u32 head,
                                mfa_u32 query, mfa_u32 key) {
  const MfaPhilox4 r = mfa_dropout_words(k0, k1, batch, head, query, key);
  const mfa_u32 sel = key & 3u;
  return sel == 0u ? r.x : sel == 1u ? r.y : sel == 2u ? r.z : r.w;
}

// 1 / (1 - rate) for a kept entry, 0 for a dropped one.
inline float mfa_dropout_factor(mfa_u32 k0, mfa_u32 k1, mfa_u32 batch, mfa_u32 head,
                                mfa_u32 query, mfa_u32 key, mfa_u32 threshold, float keep_scale) {
  return mfa_dropout_word(k0, k1, batch, head, query, key) >= threshold ? keep_scale : 0.0f;
}

// The factors of two neighbouring keys (key_first, key_first + 1): one Philox
// evaluation, or two when they straddle a group of four (key_first % 4 == 3,
// possible with an odd key origin).
struct MfaFactorPair {
  float first, second;
};
inline MfaFactorPair mfa_dropout_factor_pair(mfa_u32 k0, mfa_u32 k1, mfa_u32 batch, mfa_u32 head,
                                             mfa_u32 query, mfa_u32 key_first, mfa_u32 threshold,
                                             float keep_scale) {
  const MfaPhilox4 r = mfa_dropout_words(k0, k1, batch, head, query, key_first);
  const mfa_u32 sel = key_first & 3u;
  mfa_u32 first, second;
  if (sel == 3u) {
    first = r.w;
    second = mfa_dropout_words(k0, k1, batch, head, query, key_first + 1u).x;
  } else {
    first = sel == 0u ? r.x : sel == 1u ? r.y : r.z;
    second = sel == 0u ? r.y : sel == 1u ? r.z : r.w;
  }
  MfaFactorPair f;
  f.first = first >= threshold ? keep_scale : 0.0f;
  f.second = second >= threshold ? keep_scale : 0.0f;
  return f;
}

#endif  // JAX_MFA_METAL_DROPOUT_PHILOX_H

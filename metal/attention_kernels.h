// FlashAttention kernels in Metal Shading Language: forward, backward-query
// (dQ) and backward-key-value (dK, dV). Design notes: docs/metal.md.
//
// Every kernel is a template over
//   T   storage type: float, half, bf16_t (bfloat16 bits, widened to float
//       on load: M1/M2) or bfloat (Metal's bfloat16 type, MSL 3.1: M3 and
//       later, where the operand matrices are bfloat; see MfaOperand),
//   HP  head dim padded to a bucket (kHeadBuckets in attention_plan.h:
//       multiples of 8 from 16 to 256), a multiple of DB,
//   P   parallelization block: rows (queries, or keys for dK/dV) per
//       threadgroup; one simdgroup owns 8 of them, so P / 8 simdgroups,
//   C   traversal block: columns (keys, or queries for dK/dV) per step,
//   DB  head block: head-dim columns staged through threadgroup memory at once.
// Accumulators (S, P, O, dQ, dK, dV) are simdgroup_matrix<float, 8, 8>; the
// input operands (Q, K, V, dO) are 8x8 matrices of the storage type where
// Metal has them (mfa_operand_mat), multiplied into float accumulators. Logits are
// kept in base-2 units (scale * log2(e) folded in) so the softmax uses exp2;
// the logsumexp leaves the kernel in natural-log units.
#ifndef JAX_MFA_METAL_ATTENTION_KERNELS_H
#define JAX_MFA_METAL_ATTENTION_KERNELS_H

#include <metal_stdlib>
#ifndef JAX_MFA_EMBEDDED
#include "attention_params.h"
#endif

using namespace metal;

// Always-inlined helpers, as in MLX (Apple's and the emulator's headers may
// already define it).
#ifndef METAL_FUNC
#define METAL_FUNC inline __attribute__((__always_inline__))
#endif

// bfloat16 storage: its bits, widened to float by a shift (no bfloat type or
// bfloat arithmetic required).
struct bf16_t {
  ushort bits;
};

// Metal's own bfloat type (and simdgroup_matrix<bfloat>) exists from MSL 3.1
// (macOS 14; __METAL_VERSION__ 310, the check MLX's kernels make) and in the
// Metal emulator (no __METAL_VERSION__). The launcher compiles the M3+
// (Apple9) libraries, which store bfloat16 as bfloat, with MSL 3.1.
#if !defined(__METAL_VERSION__) || __METAL_VERSION__ >= 310
#define MFA_HAVE_BFLOAT 1
#else
#define MFA_HAVE_BFLOAT 0
#endif

// Callers pass T(element): in the Metal emulator a device half element also
// converts to float, so an overload set on float and half needs its type.
inline float mfa_to_float(float x) { return x; }
inline float mfa_to_float(half x) { return float(x); }
inline float mfa_to_float(bf16_t x) { return as_type<float>(uint(x.bits) << 16); }

template <typename T>
inline T mfa_from_float(float x);
template <>
inline float mfa_from_float<float>(float x) { return x; }
template <>
inline half mfa_from_float<half>(float x) { return half(x); }
template <>
inline bf16_t mfa_from_float<bf16_t>(float x) {
  // Round to nearest, ties to even; NaN stays a quiet NaN.
  uint u = as_type<uint>(x);
  bf16_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = ushort((u >> 16) | 0x40u);
  } else {
    r.bits = ushort((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return r;
}
#if MFA_HAVE_BFLOAT
inline float mfa_to_float(bfloat x) { return float(x); }
// The same rounding as bf16_t's (so both families store identical bits).
template <>
inline bfloat mfa_from_float<bfloat>(float x) { return as_type<bfloat>(mfa_from_float<bf16_t>(x).bits); }
#endif

// A logit at or below this (base-2 units) counts as masked; also the initial
// running maximum. Finite on purpose: the kernels never rely on infinities in
// arithmetic, so they do not depend on the math mode (the launcher asks for
// IEEE math, but fast math -- the default before macOS 15 -- assumes none).
constant constexpr float kMaskedLogit = -1.0e30f;
constant constexpr float kLog2e = 1.4426950408889634f;
constant constexpr float kLn2 = 0.6931471805599453f;

typedef simdgroup_matrix<float, 8, 8> mfa_mat;

// The matrix type of an input operand (Q, K, V, dO) stored as T: the
// storage type itself for half and bfloat (half the registers of float;
// exact, as the values are 16-bit already), float for float and for bf16_t.
// bf16_t is the M1/M2 (Apple7) storage of bfloat16: it is widened to float,
// as metal-flash-attention emulates bfloat on chips without bfloat matrices
// (their libraries compile with MSL 3.0); M3 and later (Apple9) store
// bfloat16 as bfloat and multiply bfloat matrices.
// Products accumulate in float: simdgroup_multiply_accumulate with float
// destination and accumulator and 16-bit (or mixed float x 16-bit) factors,
// as MLX's steel attention multiplies its float P by half V. P and dS stay
// float (never rounded to the storage type).
template <typename T>
struct MfaOperand {
  typedef float type;
};
template <>
struct MfaOperand<half> {
  typedef half type;
};
#if MFA_HAVE_BFLOAT
template <>
struct MfaOperand<bfloat> {
  typedef bfloat type;
};
#endif
template <typename T>
using mfa_operand_mat = simdgroup_matrix<typename MfaOperand<T>::type, 8, 8>;

// One element of T as an operand matrix element (exact: half stays half).
template <typename T>
METAL_FUNC typename MfaOperand<T>::type mfa_operand(T x) {
  return typename MfaOperand<T>::type(mfa_to_float(x));
}

// Position of a lane's two elements in an 8x8 simdgroup matrix: row
// (lane / 16) * 4 + (lane / 2) % 4, columns col and col + 1 with
// col = ((lane / 8) % 2) * 4 + (lane % 2) * 2. Lanes sharing a row differ in
// bits 0 and 3 of the lane index, so a row reduction is two xor-shuffles.
inline int mfa_lane_row(uint lane) { return int((lane / 16) * 4 + (lane / 2) % 4); }
inline int mfa_lane_col(uint lane) { return int(((lane / 8) % 2) * 4 + (lane % 2) * 2); }

METAL_FUNC float mfa_row_max(float x) {
  x = max(x, simd_shuffle_xor(x, ushort(1)));
  return max(x, simd_shuffle_xor(x, ushort(8)));
}
METAL_FUNC float mfa_row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// Loads an 8x8 block of a (positions x H) head slice straight into an
// operand matrix; rows at or past `rows_valid` and columns at or past H read
// as zero (the head dim is padded to HP inside the kernel).
template <typename T>
METAL_FUNC void mfa_load_rows(thread mfa_operand_mat<T>& m, device const T* row, bool row_ok,
                              int col, int H) {
  typedef typename MfaOperand<T>::type U;
  U a = U(0.0f), b = U(0.0f);
  if (row_ok && col < H) a = mfa_operand(T(row[col]));
  if (row_ok && col + 1 < H) b = mfa_operand(T(row[col + 1]));
  m.thread_elements()[0] = a;
  m.thread_elements()[1] = b;
}

template <typename T>
METAL_FUNC void mfa_store_rows(thread mfa_mat& m, device T* row, bool row_ok, int col, int H) {
  if (row_ok && col < H) row[col] = mfa_from_float<T>(m.thread_elements()[0]);
  if (row_ok && col + 1 < H) row[col + 1] = mfa_from_float<T>(m.thread_elements()[1]);
}

// 16 bytes of T, moved as one unit: the interior-tile loads and stores of
// mfa_stage. Aligned only as T is (no alignment is assumed of the buffers or
// of the head dim), as MLX's steel loaders copy their read vectors.
template <typename T>
struct MfaChunk {
  T v[16 / sizeof(T)];
};

// Cooperatively stages a (R x DB) tile of a head slice into threadgroup memory
// in the storage type (half the bytes of float for 16-bit storage): rows
// [0, rows_valid) from `base` (row stride `stride`), columns [d0, d0 + DB) of
// the head dim; everything else is zero. Callers put the barriers around it.
template <typename T, int R, int DB, int NT>
METAL_FUNC void mfa_stage(threadgroup T* tile, device const T* base, mfa_long stride,
                          int rows_valid, int d0, int H, uint tid) {
  // A fixed trip count, so the loops unroll (DB is a compile-time constant:
  // the division and modulo become shifts and masks, or a multiply-shift for
  // DB 24).
  if (rows_valid >= R && d0 + DB <= H) {
    // Interior tile (every row and head column exists; uniform across the
    // threadgroup): no bounds checks, and each thread moves 16-byte chunks
    // (kPerRow of them per tile row). When the threadgroup covers whole rows
    // per step, a thread's rows advance by a constant: one 64-bit multiply
    // per call, and a 64-bit add per step.
    typedef MfaChunk<T> Chunk;
    constexpr int kWidth = 16 / int(sizeof(T));
    static_assert(DB % kWidth == 0, "a head block is a whole number of 16-byte chunks");
    constexpr int kPerRow = DB / kWidth, kChunks = R * kPerRow;
    constexpr bool kRowStep = NT % kPerRow == 0;
    const int col = (int(tid) % kPerRow) * kWidth;
    device const T* src = base + mfa_long(int(tid) / kPerRow) * stride + d0 + col;
    const mfa_long src_step = kRowStep ? mfa_long(NT / kPerRow) * stride : 0;
#pragma clang loop unroll(full)
    for (int it = 0; it < (kChunks + NT - 1) / NT; ++it) {
      const int q = it * NT + int(tid);
      if (kChunks % NT != 0 && q >= kChunks) break;
      device const T* from =
          kRowStep ? src : base + mfa_long(q / kPerRow) * stride + d0 + (q % kPerRow) * kWidth;
      *reinterpret_cast<threadgroup Chunk*>(tile + q * kWidth) =
          *reinterpret_cast<device const Chunk*>(from);
      src += src_step;
    }
    return;
  }
#pragma clang loop unroll(full)
  for (int it = 0; it < (R * DB + NT - 1) / NT; ++it) {
    const int idx = it * NT + int(tid);
    if (R * DB % NT != 0 && idx >= R * DB) break;
    const int r = idx / DB, c = idx % DB;
    tile[idx] = (r < rows_valid && d0 + c < H) ? T(base[mfa_long(r) * stride + d0 + c])
                                               : mfa_from_float<T>(0.0f);
  }
}

// An 8x8 block of a staged tile (row stride `stride`) into an operand matrix,
// transposed or not. float, half and bfloat tiles go through simdgroup_load;
// bf16_t tiles are read by each lane (its two elements, widened), as MLX's
// steel kernels read theirs.
template <typename T>
METAL_FUNC void mfa_load_tile(thread mfa_operand_mat<T>& m, threadgroup T* block, int stride,
                              bool transpose, uint lane) {
  const int r = mfa_lane_row(lane), c = mfa_lane_col(lane);
  #pragma clang loop unroll(full)
  for (int e = 0; e < 2; ++e) {
    m.thread_elements()[e] = transpose ? mfa_operand(T(block[(c + e) * stride + r]))
                                       : mfa_operand(T(block[r * stride + c + e]));
  }
}
METAL_FUNC void mfa_load_tile(thread mfa_mat& m, threadgroup float* block, int stride,
                              bool transpose, uint lane) {
  (void)lane;
  simdgroup_load(m, block, stride, ulong2(0, 0), transpose);
}
METAL_FUNC void mfa_load_tile(thread simdgroup_matrix<half, 8, 8>& m, threadgroup half* block,
                              int stride, bool transpose, uint lane) {
  (void)lane;
  simdgroup_load(m, block, stride, ulong2(0, 0), transpose);
}
#if MFA_HAVE_BFLOAT
METAL_FUNC void mfa_load_tile(thread simdgroup_matrix<bfloat, 8, 8>& m, threadgroup bfloat* block,
                              int stride, bool transpose, uint lane) {
  (void)lane;
  simdgroup_load(m, block, stride, ulong2(0, 0), transpose);
}
#endif

// acc[c] += A B^T over the (padded) head dim, for the C rows of B (keys, or
// queries) at b_base (only b_rows of them exist: the last block of a span,
// e.g. on the causal diagonal, skips the 8-row chunks past them): B is staged DB head columns at a time through `tile` and
// read back transposed; A, this simdgroup's 8 rows, comes from registers
// (a_cached, HP / 8 matrices) when CACHED, else from a_row in device memory.
template <typename T, int HP, int C, int DB, int NT, bool CACHED>
METAL_FUNC void mfa_accumulate_abt(thread mfa_mat* acc, thread const mfa_operand_mat<T>* a_cached,
                               device const T* a_row, bool a_ok, device const T* b_base,
                               mfa_long b_stride, int b_rows, int mma_rows, int H, int lc,
                               threadgroup T* tile, uint tid) {
  static_assert(HP % DB == 0, "the head blocks must tile the padded head dim");
  #pragma clang loop unroll(full)
  for (int d0 = 0; d0 < HP; d0 += DB) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mfa_stage<T, C, DB, NT>(tile, b_base, b_stride, b_rows, d0, H, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    #pragma clang loop unroll(full)
    for (int kk = 0; kk < DB / 8; ++kk) {
      mfa_operand_mat<T> am;
      if (CACHED) am = a_cached[CACHED ? d0 / 8 + kk : 0];
      else mfa_load_rows(am, a_row, a_ok, d0 + kk * 8 + lc, H);
      #pragma clang loop unroll(full)
      for (int c = 0; c < C / 8; ++c) {
        // Past the rows this simdgroup needs (mma_rows <= b_rows: the block's
        // last row, or this simdgroup's last key on the causal diagonal):
        // acc stays as it is (uniform branch).
        if (c * 8 >= mma_rows) break;
        mfa_operand_mat<T> bt;
        mfa_load_tile(bt, tile + c * 8 * DB + kk * 8, DB, true, tid % 32);
        simdgroup_multiply_accumulate(acc[c], am, bt, acc[c]);
      }
    }
  }
}

// acc[h] += P B: P is this simdgroup's 8 x C block (C / 8 matrices in
// registers), B the C rows at b_base, staged DB head columns at a time.
template <typename T, int HP, int C, int DB, int NT>
METAL_FUNC void mfa_accumulate_pb(thread mfa_mat* acc, thread const mfa_mat* pm,
                              device const T* b_base, mfa_long b_stride, int b_rows,
                              int mma_rows, int H, threadgroup T* tile, uint tid) {
  static_assert(HP % DB == 0, "the head blocks must tile the accumulator's head columns");
  #pragma clang loop unroll(full)
  for (int d0 = 0; d0 < HP; d0 += DB) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mfa_stage<T, C, DB, NT>(tile, b_base, b_stride, b_rows, d0, H, tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    #pragma clang loop unroll(full)
    for (int o = 0; o < DB / 8; ++o) {
      #pragma clang loop unroll(full)
      for (int c = 0; c < C / 8; ++c) {
        if (c * 8 >= mma_rows) break;  // P's columns there are zero
        mfa_operand_mat<T> bm;
        mfa_load_tile(bm, tile + c * 8 * DB + o * 8, DB, false, tid % 32);
        simdgroup_multiply_accumulate(acc[d0 / 8 + o], pm[c], bm, acc[d0 / 8 + o]);
      }
    }
  }
}

// One step of the online softmax in base 2 over this simdgroup's 8 x (8 CB)
// logits S (ok: 2 flags per matrix, true where allowed; block_max: this
// lane's largest allowed logit): S becomes P = 2^(S - m_new) (0 where not
// allowed), the row's running max m and sum l are updated, and the factor
// 2^(m_old - m_new) that rescales the accumulator is returned.
template <int CB>
METAL_FUNC float mfa_softmax_step(thread mfa_mat* S, thread const bool* ok, float block_max,
                                  thread float& m, thread float& l) {
  const float m_new = max(m, mfa_row_max(block_max));
  const float alpha = exp2(m - m_new);
  float sum = 0.0f;
#pragma clang loop unroll(full)
  for (int c = 0; c < CB; ++c) {
#pragma clang loop unroll(full)
    for (int e = 0; e < 2; ++e) {
      const float pr = ok[c * 2 + e] ? exp2(S[c].thread_elements()[e] - m_new) : 0.0f;
      S[c].thread_elements()[e] = pr;
      sum += pr;
    }
  }
  l = l * alpha + mfa_row_sum(sum);
  m = m_new;
  return alpha;
}

METAL_FUNC mfa_long mfa_bias_offset(constant AttentionParams& p, int b, int n, int i, int j) {
  return mfa_long(b) * p.bias_strides[0] + mfa_long(n) * p.bias_strides[1] +
         mfa_long(i) * p.bias_strides[2] + mfa_long(j) * p.bias_strides[3];
}
METAL_FUNC mfa_long mfa_mask_offset(constant AttentionParams& p, int b, int n, int i, int j) {
  return mfa_long(b) * p.mask_strides[0] + mfa_long(n) * p.mask_strides[1] +
         mfa_long(i) * p.mask_strides[2] + mfa_long(j) * p.mask_strides[3];
}

// Where the bias and mask entries of one lane's line of logits lie: a query
// row i (forward, dQ, decode: along the keys) or a key column j (dK/dV: along
// the queries). The four 64-bit stride products are paid once per line, and
// one per element (the position along the line) instead of four.
struct MfaLogitLine {
  mfa_long bias_base, bias_step, mask_base, mask_step;
};
METAL_FUNC MfaLogitLine mfa_logit_line(constant AttentionParams& p, int b, int n, int i, int j,
                                       bool along_keys) {
  MfaLogitLine line = {0, 0, 0, 0};
  if (p.has_bias) {
    line.bias_base = mfa_bias_offset(p, b, n, i, j);
    line.bias_step = p.bias_strides[along_keys ? 3 : 2];
  }
  if (p.has_mask) {
    line.mask_base = mfa_mask_offset(p, b, n, i, j);
    line.mask_step = p.mask_strides[along_keys ? 3 : 2];
  }
  return line;
}

// One logit: raw q.k product -> scaled, soft-capped, biased, in base-2 units.
// `line` and `along` locate its bias and mask entries (mfa_logit_line), j is
// its key (checked against the row's span `keys`). `valid` comes back false
// for masked entries; `t` keeps the softcap's tanh for the backward's chain
// rule.
METAL_FUNC float mfa_logit(constant AttentionParams& p, device const float* bias,
                       device const uchar* mask, MfaLogitLine line, int along, int j,
                       MfaSpan keys, float s, thread bool& valid, thread float& t) {
  valid = j >= keys.begin && j < keys.end;
  float x;
  if (p.has_softcap) {
    t = precise::tanh(s * p.scale / p.softcap);
    x = p.softcap_log2 * t;
  } else {
    t = 0.0f;
    x = s * p.scale_log2;
  }
  if (valid && p.has_bias) x += bias[line.bias_base + mfa_long(along) * line.bias_step] * kLog2e;
  if (valid && p.has_mask) valid = mask[line.mask_base + mfa_long(along) * line.mask_step] != 0;
  // A -inf bias masks the entry, as it would in the reference; a NaN logit
  // stays allowed so that it makes its row NaN, as in jax.nn.
  valid = valid && !(x <= kMaskedLogit);
  return x;
}

METAL_FUNC int mfa_valid_len(device const int* lengths, int has, int b, int full) {
  if (!has) return full;
  const int given = lengths[b];
  return clamp(given, 0, full);
}

// Packed sequences: whether key j shares query i's segment (call only for
// in-range i and j).
inline bool mfa_same_segment(constant AttentionParams& p, device const int* q_segments,
                             device const int* kv_segments, int b, int i, int j) {
  return !p.has_segment_ids ||
         q_segments[mfa_long(b) * p.q_len + i] == kv_segments[mfa_long(b) * p.kv_len + j];
}

// Whether query rows [i0, i1) and keys [j0, j1) may share a segment; false
// only for sorted ids whose ranges are disjoint (the tile is then skipped).
// Uniform across the threadgroup, so a skipped tile skips its barriers too.
inline bool mfa_tile_segments_meet(constant AttentionParams& p, device const int* q_segments,
                                   device const int* kv_segments, int b, int i0, int i1, int j0,
                                   int j1) {
  if (!p.has_segment_ids || !p.segments_sorted) return true;
  i1 = min(i1, p.q_len);
  j1 = min(j1, p.kv_len);
  if (i0 >= i1 || j0 >= j1) return false;
  device const int* qs = q_segments + mfa_long(b) * p.q_len;
  device const int* ks = kv_segments + mfa_long(b) * p.kv_len;
  return mfa_sorted_segments_meet(qs[i0], qs[i1 - 1], ks[j0], ks[j1 - 1]);
}

// Whether a tile of rows [i0, i1) and keys [j0, j1) needs no per-element
// logit work (mfa_tile_fully_visible, and none of bias, bool mask, softcap and
// segment ids); uniform across the simdgroup (or threadgroup) that asks.
METAL_FUNC bool mfa_tile_visible(constant AttentionParams& p, int i0, int i1, int j0, int j1,
                                 int q_valid, int kv_valid) {
  return !p.has_bias && !p.has_mask && !p.has_softcap && !p.has_segment_ids &&
         mfa_tile_fully_visible(i0, i1, j0, j1, q_valid, kv_valid, p.causal, p.window_left,
                                p.window_right);
}

// mfa_logit and the segment check for entry (i, j) of a tile, or, in a fully
// visible tile (`visible`, uniform), just the scaled logit.
METAL_FUNC float mfa_tile_logit(constant AttentionParams& p, bool visible,
                                device const float* bias, device const uchar* mask,
                                device const int* q_segments, device const int* kv_segments,
                                MfaLogitLine line, int along, int b, int i, int j, MfaSpan keys,
                                float s, thread bool& valid, thread float& t) {
  if (visible) {
    valid = true;
    t = 0.0f;
    return s * p.scale_log2;
  }
  const float x = mfa_logit(p, bias, mask, line, along, j, keys, s, valid, t);
  valid = valid && mfa_same_segment(p, q_segments, kv_segments, b, i, j);
  return x;
}

// Running max and sum that start a row's online softmax (base-2 units): the
// sink's logit and exp2(0) = 1 with sinks, else "nothing yet".
inline void mfa_softmax_start(constant AttentionParams& p, device const float* sinks, int b,
                              int n, thread float& m, thread float& l) {
  m = kMaskedLogit;
  l = 0.0f;
  if (p.has_sinks) {
    const float s2 = sinks[mfa_long(p.sinks_batched ? b : 0) * p.q_heads + n] * kLog2e;
    if (!(s2 <= kMaskedLogit)) {  // a -inf sink is no sink; a NaN one makes rows NaN
      m = s2;
      l = 1.0f;
    }
  }
}

// The dropout seed row of batch b and the global head of local head n
// (metal/dropout_philox.h: the seed carries the counter origin).
inline device const uint* mfa_dropout_seed_row(device const uint* seed, int b) {
  return seed + MFA_DROPOUT_SEED_WORDS * mfa_long(b);
}
inline uint mfa_dropout_head(constant AttentionParams& p, device const uint* s, int n) {
  return p.dropout_broadcast_heads ? 0u : s[MFA_SEED_HEAD] + uint(n);
}
// Dropout factors of this lane's two neighbouring keys j, j + 1 (j even) in
// query row i of head n: 0 or 1 / (1 - rate).
inline MfaFactorPair mfa_dropout_keys(constant AttentionParams& p, device const uint* seed, int b,
                                      int n, int i, int j) {
  device const uint* s = mfa_dropout_seed_row(seed, b);
  return mfa_dropout_factor_pair(s[MFA_SEED_KEY0], s[MFA_SEED_KEY1], s[MFA_SEED_BATCH],
                                 mfa_dropout_head(p, s, n), s[MFA_SEED_QUERY] + uint(i),
                                 s[MFA_SEED_KEY] + uint(j), p.dropout_threshold,
                                 p.dropout_keep_scale);
}
// The factor of one entry (b, n, i, j).
inline float mfa_dropout_entry(constant AttentionParams& p, device const uint* seed, int b, int n,
                               int i, int j) {
  device const uint* s = mfa_dropout_seed_row(seed, b);
  return mfa_dropout_factor(s[MFA_SEED_KEY0], s[MFA_SEED_KEY1], s[MFA_SEED_BATCH],
                            mfa_dropout_head(p, s, n), s[MFA_SEED_QUERY] + uint(i),
                            s[MFA_SEED_KEY] + uint(j), p.dropout_threshold, p.dropout_keep_scale);
}

// ---------------------------------------------------------------------------
// Forward: one threadgroup per (batch, query head, block of P queries). Keys
// stream by in blocks of C with an online softmax; the output accumulator
// lives in registers for the whole kernel, Q too when CACHE_Q (the launch
// plan's register-cache policy, BlockConfig in cpp/metal_host/attention_plan.h).
template <typename T, int HP, int P, int C, int DB, bool CACHE_Q>
[[kernel, max_total_threads_per_threadgroup(P * 4)]] void attention_forward(constant AttentionParams& p [[buffer(0)]],
                              device const T* q [[buffer(1)]],
                              device const T* k [[buffer(2)]],
                              device const T* v [[buffer(3)]],
                              device const float* bias [[buffer(4)]],
                              device const uchar* mask [[buffer(5)]],
                              device const int* q_lengths [[buffer(6)]],
                              device const int* kv_lengths [[buffer(7)]],
                              device T* out [[buffer(8)]],
                              device float* lse [[buffer(9)]],
                              device const int* q_segments [[buffer(10)]],
                              device const int* kv_segments [[buffer(11)]],
                              device const float* sinks [[buffer(12)]],
                              device const uint* dropout_seed [[buffer(13)]],
                              uint group [[threadgroup_position_in_grid]],
                              uint sg [[simdgroup_index_in_threadgroup]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint tid [[thread_index_in_threadgroup]]) {
  constexpr int NT = P * 4;  // 32 threads per 8 rows
  constexpr int HB = HP / 8, CB = C / 8;
  threadgroup T tile[C * DB];

  const int linear = p.group_offset + int(group);
  const int qb = linear % p.num_row_blocks;
  const int n = (linear / p.num_row_blocks) % p.q_heads;
  const int b = linear / (p.num_row_blocks * p.q_heads);
  const int kvh = n / p.group_size;
  const int H = p.head_dim, N = p.q_heads, K = p.kv_heads;
  const int i0 = qb * P;
  const int q_valid = mfa_valid_len(q_lengths, p.has_q_lengths, b, p.q_len);
  const int kv_valid = mfa_valid_len(kv_lengths, p.has_kv_lengths, b, p.kv_len);
  const MfaSpan span = mfa_key_span_of_rows(i0, i0 + P, q_valid, kv_valid, p.causal,
                                            p.window_left, p.window_right);

  const int lr = mfa_lane_row(lane), lc = mfa_lane_col(lane);
  // The end of this simdgroup's 8 rows' keys: on the causal diagonal the
  // matrix work stops there, 8 rows at a time (the tile is still staged whole).
  const int sg_keys_end = mfa_key_span_of_rows(i0 + int(sg) * 8, i0 + int(sg) * 8 + 8, q_valid,
                                               kv_valid, p.causal, p.window_left,
                                               p.window_right).end;
  const int i = i0 + int(sg) * 8 + lr;  // this lane's query row
  const bool row_ok = i < p.q_len;
  const MfaSpan keys = mfa_key_span(i, q_valid, kv_valid, p.causal, p.window_left, p.window_right);
  const MfaLogitLine line = mfa_logit_line(p, b, n, i, 0, true);
  device const T* q_row = q + ((mfa_long(b) * p.q_len + (row_ok ? i : 0)) * N + n) * H;
  const mfa_long kv_stride = mfa_long(K) * H;

  mfa_mat O[HB];
  mfa_operand_mat<T> Qc[CACHE_Q ? HB : 1];
  #pragma clang loop unroll(full)
  for (int h = 0; h < HB; ++h) O[h] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if (CACHE_Q && !(span.begin >= span.end))
    #pragma clang loop unroll(full)
    for (int h = 0; h < HB; ++h) mfa_load_rows(Qc[CACHE_Q ? h : 0], q_row, row_ok, h * 8 + lc, H);

  float m, l;
  mfa_softmax_start(p, sinks, b, n, m, l);
  for (int j0 = span.begin; j0 < span.end; j0 += C) {
    const int cols = min(C, span.end - j0);
    if (!mfa_tile_segments_meet(p, q_segments, kv_segments, b, i0, i0 + P, j0, j0 + cols))
      continue;
    device const T* k_base = k + (mfa_long(b) * p.kv_len + j0) * kv_stride + mfa_long(kvh) * H;
    device const T* v_base = v + (mfa_long(b) * p.kv_len + j0) * kv_stride + mfa_long(kvh) * H;

    // S = Q K^T over the head dim, one head block of K at a time.
    mfa_mat S[CB];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) S[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    const int sg_cols = clamp(sg_keys_end - j0, 0, cols);
    mfa_accumulate_abt<T, HP, C, DB, NT, CACHE_Q>(S, Qc, q_row, row_ok, k_base, kv_stride, cols,
                                                  sg_cols, H, lc, tile, tid);

    // Masks (only on tiles that need them), then the online softmax in base 2.
    const bool visible = mfa_tile_visible(p, i0 + int(sg) * 8, i0 + int(sg) * 8 + 8, j0, j0 + C,
                                          q_valid, kv_valid);
    float block_max = kMaskedLogit;
    bool ok[CB][2];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) {
      #pragma clang loop unroll(full)
      for (int e = 0; e < 2; ++e) {
        const int j = j0 + c * 8 + lc + e;
        float t;
        bool valid;
        const float x = mfa_tile_logit(p, visible, bias, mask, q_segments, kv_segments, line, j,
                                       b, i, j, keys, S[c].thread_elements()[e], valid, t);
        ok[c][e] = valid;
        S[c].thread_elements()[e] = x;
        if (valid) block_max = max(block_max, x);
      }
    }
    const float alpha = mfa_softmax_step<CB>(S, &ok[0][0], block_max, m, l);
    // Dropout after the sum: the normaliser l is not dropped.
    if (p.has_dropout) {
      #pragma clang loop unroll(full)
      for (int c = 0; c < CB; ++c) {
        const MfaFactorPair z = mfa_dropout_keys(p, dropout_seed, b, n, i, j0 + c * 8 + lc);
        S[c].thread_elements()[0] *= z.first;
        S[c].thread_elements()[1] *= z.second;
      }
    }
    #pragma clang loop unroll(full)
    for (int h = 0; h < HB; ++h) {
      O[h].thread_elements()[0] *= alpha;
      O[h].thread_elements()[1] *= alpha;
    }

    // O += P V, one head block of V at a time.
    mfa_accumulate_pb<T, HP, C, DB, NT>(O, S, v_base, kv_stride, cols, sg_cols, H, tile, tid);
  }

  // Normalize; a row with no allowed key gets zeros and lse = -inf (a NaN
  // logit made l NaN: out and lse stay NaN).
  const bool empty = l == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / l;
  device T* out_row = out + ((mfa_long(b) * p.q_len + (row_ok ? i : 0)) * N + n) * H;
  #pragma clang loop unroll(full)
  for (int h = 0; h < HB; ++h) {
    O[h].thread_elements()[0] *= inv;
    O[h].thread_elements()[1] *= inv;
    mfa_store_rows(O[h], out_row, row_ok, h * 8 + lc, H);
  }
  if (row_ok && (lane & 9u) == 0u) {
    lse[(mfa_long(b) * p.q_len + i) * N + n] =
        empty ? as_type<float>(0xff800000u) : (m + log2(l)) * kLn2;
  }
}

// ---------------------------------------------------------------------------
// Backward, query side: one threadgroup per (batch, query head, block of P
// queries) computes dQ. P is recomputed from the saved logsumexp; delta =
// rowsum(dO * O) - dlse arrives precomputed. With a bias constant along keys
// it also writes per-row sums of dS (the host reduces them into dbias).
// CACHE_Q, CACHE_DO: Q, dO kept in registers for the whole kernel (the plan's
// register-cache policy), else reloaded through threadgroup memory per step.
template <typename T, int HP, int P, int C, int DB, bool CACHE_Q, bool CACHE_DO>
[[kernel, max_total_threads_per_threadgroup(P * 4)]] void attention_backward_query(constant AttentionParams& p [[buffer(0)]],
                                     device const T* q [[buffer(1)]],
                                     device const T* k [[buffer(2)]],
                                     device const T* v [[buffer(3)]],
                                     device const float* bias [[buffer(4)]],
                                     device const uchar* mask [[buffer(5)]],
                                     device const int* q_lengths [[buffer(6)]],
                                     device const int* kv_lengths [[buffer(7)]],
                                     device const float* lse [[buffer(8)]],
                                     device const T* dout [[buffer(9)]],
                                     device const float* delta [[buffer(10)]],
                                     device T* dq [[buffer(11)]],
                                     device float* dbias_rows [[buffer(12)]],
                                     device const int* q_segments [[buffer(13)]],
                                     device const int* kv_segments [[buffer(14)]],
                                     device const float* sinks [[buffer(15)]],
                                     device const uint* dropout_seed [[buffer(16)]],
                                     uint group [[threadgroup_position_in_grid]],
                                     uint sg [[simdgroup_index_in_threadgroup]],
                                     uint lane [[thread_index_in_simdgroup]],
                                     uint tid [[thread_index_in_threadgroup]]) {
  constexpr int NT = P * 4;
  constexpr int HB = HP / 8, CB = C / 8;
  threadgroup T tile[C * DB];

  const int linear = p.group_offset + int(group);
  const int qb = linear % p.num_row_blocks;
  const int n = (linear / p.num_row_blocks) % p.q_heads;
  const int b = linear / (p.num_row_blocks * p.q_heads);
  const int kvh = n / p.group_size;
  const int H = p.head_dim, N = p.q_heads, K = p.kv_heads;
  const int i0 = qb * P;
  const int q_valid = mfa_valid_len(q_lengths, p.has_q_lengths, b, p.q_len);
  const int kv_valid = mfa_valid_len(kv_lengths, p.has_kv_lengths, b, p.kv_len);
  const MfaSpan span = mfa_key_span_of_rows(i0, i0 + P, q_valid, kv_valid, p.causal,
                                            p.window_left, p.window_right);

  const int lr = mfa_lane_row(lane), lc = mfa_lane_col(lane);
  // The end of this simdgroup's 8 rows' keys: on the causal diagonal the
  // matrix work stops there, 8 rows at a time (the tile is still staged whole).
  const int sg_keys_end = mfa_key_span_of_rows(i0 + int(sg) * 8, i0 + int(sg) * 8 + 8, q_valid,
                                               kv_valid, p.causal, p.window_left,
                                               p.window_right).end;
  const int i = i0 + int(sg) * 8 + lr;
  const bool row_ok = i < p.q_len;
  const MfaSpan keys = mfa_key_span(i, q_valid, kv_valid, p.causal, p.window_left, p.window_right);
  const MfaLogitLine line = mfa_logit_line(p, b, n, i, 0, true);
  const mfa_long row_index = (mfa_long(b) * p.q_len + (row_ok ? i : 0)) * N + n;
  device const T* q_row = q + row_index * H;
  device const T* do_row = dout + row_index * H;
  const float row_lse = row_ok ? lse[row_index] : 0.0f;
  const bool row_empty = row_lse <= kMaskedLogit;  // NaN: not empty, gradients NaN
  const float row_lse2 = row_empty ? 0.0f : row_lse * kLog2e;
  const float row_delta = row_ok ? delta[row_index] : 0.0f;
  const mfa_long kv_stride = mfa_long(K) * H;

  mfa_mat dQ[HB];
  mfa_operand_mat<T> Qc[CACHE_Q ? HB : 1], dOc[CACHE_DO ? HB : 1];
  #pragma clang loop unroll(full)
  for (int h = 0; h < HB; ++h) dQ[h] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  if ((CACHE_Q || CACHE_DO) && !(span.begin >= span.end)) {
    #pragma clang loop unroll(full)
    for (int h = 0; h < HB; ++h) {
      if (CACHE_Q) mfa_load_rows(Qc[CACHE_Q ? h : 0], q_row, row_ok, h * 8 + lc, H);
      if (CACHE_DO) mfa_load_rows(dOc[CACHE_DO ? h : 0], do_row, row_ok, h * 8 + lc, H);
    }
  }
  float ds_sum = 0.0f;

  for (int j0 = span.begin; j0 < span.end; j0 += C) {
    const int cols = min(C, span.end - j0);
    if (!mfa_tile_segments_meet(p, q_segments, kv_segments, b, i0, i0 + P, j0, j0 + cols))
      continue;
    device const T* k_base = k + (mfa_long(b) * p.kv_len + j0) * kv_stride + mfa_long(kvh) * H;
    device const T* v_base = v + (mfa_long(b) * p.kv_len + j0) * kv_stride + mfa_long(kvh) * H;

    // S = Q K^T and dP = dO V^T.
    mfa_mat S[CB], dP[CB];
    #pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) {
      S[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      dP[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
    const int sg_cols = clamp(sg_keys_end - j0, 0, cols);
    mfa_accumulate_abt<T, HP, C, DB, NT, CACHE_Q>(S, Qc, q_row, row_ok, k_base, kv_stride, cols,
                                                  sg_cols, H, lc, tile, tid);
    mfa_accumulate_abt<T, HP, C, DB, NT, CACHE_DO>(dP, dOc, do_row, row_ok, v_base, kv_stride,
                                                   cols, sg_cols, H, lc, tile, tid);

    // P = exp2(logit - L), dS = P (dP Z - delta) with dropout factors Z;
    // S becomes dS * d(logit)/d(q.k). Masks only on tiles that need them.
    const bool visible = mfa_tile_visible(p, i0 + int(sg) * 8, i0 + int(sg) * 8 + 8, j0, j0 + C,
                                          q_valid, kv_valid);
    #pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) {
      MfaFactorPair z;
      z.first = z.second = 1.0f;
      if (p.has_dropout) z = mfa_dropout_keys(p, dropout_seed, b, n, i, j0 + c * 8 + lc);
      #pragma clang loop unroll(full)
      for (int e = 0; e < 2; ++e) {
        const int j = j0 + c * 8 + lc + e;
        float t;
        bool valid;
        const float x = mfa_tile_logit(p, visible, bias, mask, q_segments, kv_segments, line, j,
                                       b, i, j, keys, S[c].thread_elements()[e], valid, t);
        const float pr = (valid && !row_empty) ? exp2(x - row_lse2) : 0.0f;
        const float ds = pr * (dP[c].thread_elements()[e] * (e == 0 ? z.first : z.second) -
                               row_delta);
        ds_sum += ds;
        S[c].thread_elements()[e] = ds * p.scale * (p.has_softcap ? 1.0f - t * t : 1.0f);
      }
    }

    // dQ += dS K, restaging K one head block at a time.
    mfa_accumulate_pb<T, HP, C, DB, NT>(dQ, S, k_base, kv_stride, cols, sg_cols, H, tile, tid);
  }

  device T* dq_row = dq + row_index * H;
  #pragma clang loop unroll(full)
  for (int h = 0; h < HB; ++h) mfa_store_rows(dQ[h], dq_row, row_ok, h * 8 + lc, H);
  ds_sum = mfa_row_sum(ds_sum);
  if (p.dbias_mode == MFA_DBIAS_ROW_SUMS && row_ok && (lane & 9u) == 0u)
    dbias_rows[(mfa_long(b) * N + n) * p.q_len + i] = ds_sum;
}

// Stores a key row's OB 8x8 blocks of dK and dV (columns at or past `cols`
// dropped), into dK/dV or, for a split GQA group, its float32 partials.
template <typename U, int OB>
METAL_FUNC void mfa_store_key_rows(thread mfa_mat* dK, thread mfa_mat* dV,
                                   device U* dk_row, device U* dv_row, bool key_ok, int lc,
                                   int cols) {
  #pragma clang loop unroll(full)
  for (int h = 0; h < OB; ++h) {
    mfa_store_rows(dK[h], dk_row, key_ok, h * 8 + lc, cols);
    mfa_store_rows(dV[h], dv_row, key_ok, h * 8 + lc, cols);
  }
}

// ---------------------------------------------------------------------------
// Backward, key/value side: one threadgroup per block of P keys of one (batch,
// kv head) computes dK and dV, looping over the query heads of its GQA group
// (and over the batches / kv heads a broadcast bias merges), so every output
// element has exactly one writer and no atomics are needed. When the merged
// pairs are too much serial work for one threadgroup, they are split into
// slices (kv_splits); each slice owns its own dbias slot, summed by the host.
// When B * K is small (or one group is too much serial work), the G query
// heads of the group are split over group_splits threadgroups instead, each
// writing float32 partial dK and dV that attention_backward_kv_reduce sums.
// HO < HP splits the head columns of dK and dV over ceil(HP / HO) threadgroups per
// key block (each recomputes S^T and dP^T; the first one accumulates dbias),
// so that both accumulators fit in registers at large head dims.
// CACHE_K, CACHE_V: K, V kept in registers for the whole key block (the
// plan's register-cache policy), else reloaded through threadgroup memory.
template <typename T, int HP, int P, int C, int DB, int HO, bool CACHE_K, bool CACHE_V>
[[kernel, max_total_threads_per_threadgroup(P * 4)]] void attention_backward_key_value(constant AttentionParams& p [[buffer(0)]],
                                         device const T* q [[buffer(1)]],
                                         device const T* k [[buffer(2)]],
                                         device const T* v [[buffer(3)]],
                                         device const float* bias [[buffer(4)]],
                                         device const uchar* mask [[buffer(5)]],
                                         device const int* q_lengths [[buffer(6)]],
                                         device const int* kv_lengths [[buffer(7)]],
                                         device const float* lse [[buffer(8)]],
                                         device const T* dout [[buffer(9)]],
                                         device const float* delta [[buffer(10)]],
                                         device T* dk [[buffer(11)]],
                                         device T* dv [[buffer(12)]],
                                         device float* dbias [[buffer(13)]],
                                         device const int* q_segments [[buffer(14)]],
                                         device const int* kv_segments [[buffer(15)]],
                                         device const float* sinks [[buffer(16)]],
                                         device const uint* dropout_seed [[buffer(17)]],
                                         device float* dk_partial [[buffer(18)]],
                                         device float* dv_partial [[buffer(19)]],
                                         uint group [[threadgroup_position_in_grid]],
                                         uint sg [[simdgroup_index_in_threadgroup]],
                                         uint lane [[thread_index_in_simdgroup]],
                                         uint tid [[thread_index_in_threadgroup]]) {
  constexpr int NT = P * 4;
  constexpr int HB = HP / 8, CB = C / 8, OB = HO / 8;
  threadgroup T tile[C * DB];
  threadgroup float lse_t[C];
  threadgroup float delta_t[C];

  const int h_tasks = p.merge_heads ? 1 : p.kv_heads;
  constexpr int kHeadParts = (HP + HO - 1) / HO;  // the last may end past HP (zero columns)
  const int head_part = (p.group_offset + int(group)) % kHeadParts;
  const int h_out = head_part * HO;  // first head column of dK and dV this threadgroup owns
  const int linear = (p.group_offset + int(group)) / kHeadParts;
  const int kb = linear % p.num_row_blocks;
  const int gsplit = (linear / p.num_row_blocks) % p.group_splits;  // slice of the GQA group
  const int kv_linear = linear / (p.num_row_blocks * p.group_splits);
  const int split = kv_linear % p.kv_splits;
  const int ht = (kv_linear / p.kv_splits) % h_tasks;
  const int bt = kv_linear / (p.kv_splits * h_tasks);
  const int b_begin = p.merge_batches ? 0 : bt;
  const int h_begin = p.merge_heads ? 0 : ht, h_count = p.merge_heads ? p.kv_heads : 1;
  const int pairs = (p.merge_batches ? p.batch : 1) * h_count;
  const int pair_begin = split * p.pairs_per_split;
  const int pair_end = min(pairs, pair_begin + p.pairs_per_split);
  const int H = p.head_dim, N = p.q_heads, K = p.kv_heads, G = p.group_size;
  const int j0 = kb * P;

  const int lr = mfa_lane_row(lane), lc = mfa_lane_col(lane);
  const int j = j0 + int(sg) * 8 + lr;  // this lane's key row
  const bool key_ok = j < p.kv_len;
  const mfa_long q_stride = mfa_long(N) * H;
  const bool dbias_keys = p.dbias_mode == MFA_DBIAS_KEYS && head_part == 0;
  device float* dbias_out = dbias + mfa_long(split) * p.dbias_slot;  // this slice's slot

  // The (batch, kv head) pairs of this threadgroup's slice, in order.
  for (int pair = pair_begin; pair < pair_end; ++pair) {
    const int b = b_begin + pair / h_count;
    const int kvh = h_begin + pair % h_count;
    const int q_valid = mfa_valid_len(q_lengths, p.has_q_lengths, b, p.q_len);
    const int kv_valid = mfa_valid_len(kv_lengths, p.has_kv_lengths, b, p.kv_len);
    const MfaSpan rows = mfa_query_span_of_keys(j0, j0 + P, q_valid, kv_valid, p.causal,
                                                p.window_left, p.window_right);
    {
      const mfa_long key_index = (mfa_long(b) * p.kv_len + (key_ok ? j : 0)) * K + kvh;
      device const T* k_row = k + key_index * H;
      device const T* v_row = v + key_index * H;
      mfa_mat dK[OB], dV[OB];
      mfa_operand_mat<T> Kc[CACHE_K ? HB : 1], Vc[CACHE_V ? HB : 1];
      #pragma clang loop unroll(full)
      for (int h = 0; h < OB; ++h) {
        dK[h] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        dV[h] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      }
      if ((CACHE_K || CACHE_V) && !(rows.begin >= rows.end)) {
        #pragma clang loop unroll(full)
        for (int h = 0; h < HB; ++h) {
          if (CACHE_K) mfa_load_rows(Kc[CACHE_K ? h : 0], k_row, key_ok, h * 8 + lc, H);
          if (CACHE_V) mfa_load_rows(Vc[CACHE_V ? h : 0], v_row, key_ok, h * 8 + lc, H);
        }
      }

      const int n_begin = kvh * G + gsplit * p.heads_per_group_split;
      const int n_end = min((kvh + 1) * G, n_begin + p.heads_per_group_split);
      for (int n = n_begin; n < n_end && !(rows.begin >= rows.end); ++n) {
        const MfaLogitLine line = mfa_logit_line(p, b, n, 0, j, false);
        for (int i0 = rows.begin; i0 < rows.end; i0 += C) {
          const int cnt = min(C, rows.end - i0);
          if (!mfa_tile_segments_meet(p, q_segments, kv_segments, b, i0, i0 + cnt, j0, j0 + P))
            continue;
          device const T* q_base = q + (mfa_long(b) * p.q_len + i0) * q_stride + mfa_long(n) * H;
          device const T* do_base =
              dout + (mfa_long(b) * p.q_len + i0) * q_stride + mfa_long(n) * H;

          threadgroup_barrier(mem_flags::mem_threadgroup);
          for (int r = int(tid); r < C; r += NT) {
            float l2 = 0.0f, dl = 0.0f;
            bool empty = true;
            if (r < cnt) {
              const mfa_long idx = (mfa_long(b) * p.q_len + i0 + r) * N + n;
              const float x = lse[idx];
              empty = x <= kMaskedLogit;  // NaN: not empty, gradients NaN
              l2 = x * kLog2e;
              dl = delta[idx];
            }
            // An empty row is flagged by a lse below the mask threshold.
            lse_t[r] = empty ? 2.0f * kMaskedLogit : l2;
            delta_t[r] = dl;
          }

          // S^T = K Q^T and dP^T = V dO^T: rows are keys, columns queries.
          mfa_mat ST[CB], dPT[CB];
          #pragma clang loop unroll(full)
          for (int c = 0; c < CB; ++c) {
            ST[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            dPT[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
          }
          mfa_accumulate_abt<T, HP, C, DB, NT, CACHE_K>(ST, Kc, k_row, key_ok, q_base, q_stride,
                                                        cnt, cnt, H, lc, tile, tid);
          mfa_accumulate_abt<T, HP, C, DB, NT, CACHE_V>(dPT, Vc, v_row, key_ok, do_base,
                                                        q_stride, cnt, cnt, H, lc, tile, tid);

          // P^T and dS^T; ST becomes P^T, dPT becomes dS^T * d(logit)/d(q.k).
          // Masks only on tiles that need them (this simdgroup's 8 keys x C
          // queries); a visible tile also skips each query's key span.
          const bool visible = mfa_tile_visible(p, i0, i0 + C, j0 + int(sg) * 8,
                                                j0 + int(sg) * 8 + 8, q_valid, kv_valid);
          float ds_row = 0.0f;
          #pragma clang loop unroll(full)
          for (int c = 0; c < CB; ++c) {
            #pragma clang loop unroll(full)
            for (int e = 0; e < 2; ++e) {
              const int col = c * 8 + lc + e;
              const int i = i0 + col;
              MfaSpan keys = {0, 0};
              if (!visible)
                keys = mfa_key_span(i, q_valid, kv_valid, p.causal, p.window_left, p.window_right);
              float t;
              bool valid;
              const float x = mfa_tile_logit(p, visible, bias, mask, q_segments, kv_segments, line,
                                             i, b, i, j, keys, ST[c].thread_elements()[e], valid, t);
              const float l2 = lse_t[col];
              const bool live = valid && !(l2 <= kMaskedLogit);
              const float pr = live ? exp2(x - l2) : 0.0f;
              // Dropout: dV takes (P Z)^T dO and dS = P (dP Z - delta).
              const float z = (p.has_dropout && live) ? mfa_dropout_entry(p, dropout_seed, b, n, i, j)
                                                      : 1.0f;
              const float ds = pr * (dPT[c].thread_elements()[e] * z - delta_t[col]);
              ST[c].thread_elements()[e] = pr * z;
              dPT[c].thread_elements()[e] =
                  ds * p.scale * (p.has_softcap ? 1.0f - t * t : 1.0f);
              if (dbias_keys) {
                if (p.bias_query_broadcast) {
                  ds_row += ds;
                } else if (live && key_ok) {
                  dbias_out[mfa_bias_offset(p, b, n, i, j)] += ds;
                }
              }
            }
          }
          if (dbias_keys && p.bias_query_broadcast) {
            // Every query of the block maps to the same dbias element: reduce
            // across the row's lanes first, then one lane per key writes.
            ds_row = mfa_row_sum(ds_row);
            if (key_ok && (lane & 9u) == 0u) dbias_out[mfa_bias_offset(p, b, n, 0, j)] += ds_row;
          }

          // dV += P^T dO and dK += dS^T Q over this threadgroup's head
          // columns, restaging dO and Q by head block.
          mfa_accumulate_pb<T, HO, C, DB, NT>(dV, ST, do_base + h_out, q_stride, cnt, cnt,
                                              H - h_out, tile, tid);
          mfa_accumulate_pb<T, HO, C, DB, NT>(dK, dPT, q_base + h_out, q_stride, cnt, cnt,
                                              H - h_out, tile, tid);
        }
      }

      if (p.group_splits > 1) {
        // This slice's float32 partial, (B, K, group_splits, S, H).
        const mfa_long slot =
            ((mfa_long(b) * K + kvh) * p.group_splits + gsplit) * p.kv_len + (key_ok ? j : 0);
        mfa_store_key_rows<float, OB>(dK, dV, dk_partial + slot * H + h_out,
                                      dv_partial + slot * H + h_out, key_ok, lc, H - h_out);
      } else {
        mfa_store_key_rows<T, OB>(dK, dV, dk + key_index * H + h_out, dv + key_index * H + h_out,
                                  key_ok, lc, H - h_out);
      }
    }
  }
}

// Sums the group_splits float32 partials of a split GQA group into dK and dV
// (storage type), one thread per element of the (B, S, K, H) outputs, in
// split order (deterministic).
template <typename T>
[[kernel, max_total_threads_per_threadgroup(MFA_REDUCE_THREADS)]] void attention_backward_kv_reduce(
    constant AttentionParams& p [[buffer(0)]], device const float* dk_partial [[buffer(1)]],
    device const float* dv_partial [[buffer(2)]], device T* dk [[buffer(3)]],
    device T* dv [[buffer(4)]], uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  const int H = p.head_dim, K = p.kv_heads, S = p.kv_len, splits = p.group_splits;
  const mfa_long e = (mfa_long(p.group_offset) + mfa_long(group)) * MFA_REDUCE_THREADS + tid;
  if (e >= mfa_long(p.batch) * S * K * H) return;
  const int d = int(e % H);
  const int kvh = int((e / H) % K);
  const int j = int((e / (mfa_long(H) * K)) % S);
  const int b = int(e / (mfa_long(H) * K * S));
  float sk = 0.0f, sv = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const mfa_long at = (((mfa_long(b) * K + kvh) * splits + s) * S + j) * H + d;
    sk += dk_partial[at];
    sv += dv_partial[at];
  }
  dk[e] = mfa_from_float<T>(sk);
  dv[e] = mfa_from_float<T>(sv);
}

#endif  // JAX_MFA_METAL_ATTENTION_KERNELS_H

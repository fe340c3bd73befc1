// The parameter block of the Metal attention kernels, shared by the host (C++)
// and the kernels (Metal Shading Language): one definition, one layout.
//
// The host builds an AttentionParams from jax_mfa::AttentionProblem
// (cpp/metal_host/attention_plan.cc) and binds it as `constant
// AttentionParams&`. Every 64-bit member comes first and every 32-bit member
// after it, so the layout is the same under both compilers (checked by a
// static_assert on the host side).
//
// The masking rules below mirror AttentionProblem::key_span,
// key_span_of_rows and query_span_of_keys in cpp/attention/problem.h; the
// emulated test suite compares the Metal kernels against the CPU kernels, which
// use problem.h, on every mask feature, so the two cannot drift silently.
#ifndef JAX_MFA_METAL_ATTENTION_PARAMS_H
#define JAX_MFA_METAL_ATTENTION_PARAMS_H

#ifndef JAX_MFA_EMBEDDED
#include "dropout_philox.h"
#endif

#if defined(__METAL_VERSION__)
typedef long mfa_long;
typedef int mfa_int;
#else
#include <cstdint>
typedef int64_t mfa_long;
typedef int32_t mfa_int;
#endif

// Which pass produces the bias gradient (see docs/metal.md).
#define MFA_DBIAS_NONE 0
#define MFA_DBIAS_KEYS 1       // bias varies along keys: the dK/dV kernel owns it
#define MFA_DBIAS_ROW_SUMS 2   // bias constant along keys: dQ kernel writes row sums

struct AttentionParams {
  // Element strides of the (B, N, T, S) bias and mask views; 0 where broadcast.
  mfa_long bias_strides[4];
  mfa_long mask_strides[4];
  // dK/dV kernel with kv_splits > 1: elements of one partial-dbias slot (the
  // host binds kv_splits slots as dbias and sums them); 0 otherwise.
  mfa_long dbias_slot;

  // Shapes: query (B, T, N, H); key/value (B, S, K, H).
  mfa_int batch, q_len, kv_len, q_heads, kv_heads, head_dim, group_size;

  // Logit rules. scale_log2 = scale * log2(e); softcap_log2 = softcap * log2(e).
  float scale, scale_log2, softcap, softcap_log2;
  mfa_int has_softcap, causal, window_left, window_right;  // window: -1 unbounded
  mfa_int has_q_lengths, has_kv_lengths, has_bias, has_mask;

  // Bias-gradient ownership: MFA_DBIAS_*; bias dims (1 or full) along B and N.
  mfa_int dbias_mode, bias_batch_dim, bias_head_dim, bias_query_broadcast;

  // Grid decomposition. The forward and dQ kernels own query blocks
  // (num_row_blocks of block_rows); the dK/dV kernel owns key blocks, with
  // `merge_batches`/`merge_heads` folding broadcast dims of the bias into one
  // threadgroup so each dbias element has one writer.
  mfa_int num_row_blocks, block_rows;
  mfa_int merge_batches, merge_heads;
  // A long dispatch is split into chunks; threadgroup g of a chunk works on
  // linear block index group_offset + g.
  mfa_int group_offset, total_groups;
  // dK/dV kernel: the (batch, kv head) pairs a merged threadgroup would loop
  // over are split into kv_splits slices of pairs_per_split pairs, one
  // threadgroup each, bounding one threadgroup's serial work (the GPU
  // watchdog); each slice accumulates dbias into its own slot.
  mfa_int kv_splits, pairs_per_split;

  // Packed sequences: q_segments (B, T) and kv_segments (B, S) int32; with
  // segments_sorted (every row non-decreasing, checked by the host) a tile
  // whose first/last ids cannot match is skipped.
  mfa_int has_segment_ids, segments_sorted;
  // Sinks (sinks_batched ? B : 1, N), float, natural-log units.
  mfa_int has_sinks, sinks_batched;
  // Dropout (metal/dropout_philox.h); dropout_seed (B, MFA_DROPOUT_SEED_WORDS) uint.
  mfa_int has_dropout, dropout_broadcast_heads;
  mfa_u32 dropout_threshold;
  float dropout_keep_scale;
  // Split-key decode (metal/attention_decode.h): keys split into
  // decode_splits ranges of decode_keys_per_split keys; num_row_blocks counts
  // the 8-row tiles of a GQA group's T x G rows.
  mfa_int decode_splits, decode_keys_per_split;
  // dK/dV kernel, split GQA group: the G query heads of one kv head are
  // split over group_splits threadgroups of heads_per_group_split heads;
  // with group_splits > 1 each writes float32 partial dK and dV of shape
  // (B, K, group_splits, S, H) and the reduction kernel sums them.
  mfa_int group_splits, heads_per_group_split;
};

// Whether sorted segment ids of query rows [i0, i1) and keys [j0, j1) (both
// non-empty) can share a segment: their [first, last] id ranges overlap.
inline bool mfa_sorted_segments_meet(mfa_int q_first, mfa_int q_last, mfa_int kv_first,
                                     mfa_int kv_last) {
  return q_first <= kv_last && kv_first <= q_last;
}

// The most key splits of one decode row (the merge kernel keeps one weight
// per split in threadgroup memory).
#define MFA_MAX_DECODE_SPLITS 1024

// Threads per threadgroup of the split GQA group's dK/dV reduction kernel.
#define MFA_REDUCE_THREADS 256

// Register-cache defaults, after MFA's published choices: the forward kernel
// keeps Q in registers for the whole run up to head bucket 96 (as MFA's M3
// forward tables do), the dQ kernel Q and dO and the dK/dV kernel K and V up
// to 64. The launch plan starts from these and caches more operands where
// its register model has room (block_config in cpp/metal_host/attention_plan.cc);
// the kernels take the plan's choice as template parameters. The decode
// partial kernel keeps Q up to bucket 128 (one definition for the kernel and
// the register model).
constexpr inline bool mfa_forward_caches_q(mfa_int head_pad) { return head_pad <= 96; }
constexpr inline bool mfa_backward_caches_rows(mfa_int head_pad) { return head_pad <= 64; }
constexpr inline bool mfa_decode_caches_q(mfa_int head_pad) { return head_pad <= 128; }

// Half-open range of key (or query) positions.
struct MfaSpan {
  mfa_int begin, end;
};

inline mfa_int mfa_min(mfa_int a, mfa_int b) { return a < b ? a : b; }
inline mfa_int mfa_max(mfa_int a, mfa_int b) { return a > b ? a : b; }

// Keys row i may attend to under lengths, causal and window (mirror of
// AttentionProblem::key_span).
inline MfaSpan mfa_key_span(mfa_int i, mfa_int q_valid, mfa_int kv_valid, mfa_int causal,
                            mfa_int window_left, mfa_int window_right) {
  MfaSpan s;
  s.begin = 0;
  s.end = 0;
  if (i >= q_valid) return s;
  mfa_int lo = 0, hi = kv_valid;
  if (causal) hi = mfa_min(hi, i + 1);
  if (window_left >= 0) lo = mfa_max(lo, i - window_left);
  if (window_right >= 0) hi = mfa_min(hi, i + window_right + 1);
  s.begin = lo;
  s.end = mfa_max(lo, hi);
  return s;
}

// Keys any row of [i0, i1) may attend to (mirror of key_span_of_rows).
inline MfaSpan mfa_key_span_of_rows(mfa_int i0, mfa_int i1, mfa_int q_valid, mfa_int kv_valid,
                                    mfa_int causal, mfa_int window_left, mfa_int window_right) {
  MfaSpan s;
  s.begin = 0;
  s.end = 0;
  i1 = mfa_min(i1, q_valid);
  if (i0 >= i1) return s;
  MfaSpan first = mfa_key_span(i0, q_valid, kv_valid, causal, window_left, window_right);
  MfaSpan last = mfa_key_span(i1 - 1, q_valid, kv_valid, causal, window_left, window_right);
  // An empty row span {lo, lo} may lie past kv_valid (a left window edge beyond
  // the last key); no row attends past kv_valid, so clamp the union's end.
  // (problem.h's key_span_of_rows lacks this clamp; see docs/metal.md.)
  s.begin = first.begin;
  s.end = mfa_min(mfa_max(first.begin, last.end), kv_valid);
  if (s.end < s.begin) s.end = s.begin;
  return s;
}

// Query rows that may attend to any key of [j0, j1) (mirror of query_span_of_keys).
inline MfaSpan mfa_query_span_of_keys(mfa_int j0, mfa_int j1, mfa_int q_valid, mfa_int kv_valid,
                                      mfa_int causal, mfa_int window_left, mfa_int window_right) {
  MfaSpan s;
  s.begin = 0;
  s.end = 0;
  j1 = mfa_min(j1, kv_valid);
  if (j0 >= j1) return s;
  mfa_int lo = 0, hi = q_valid;
  if (causal) lo = mfa_max(lo, j0);
  if (window_right >= 0) lo = mfa_max(lo, j0 - window_right);
  if (window_left >= 0) hi = mfa_min(hi, j1 + window_left);
  s.begin = lo;
  s.end = mfa_max(lo, hi);
  return s;
}

// Tile classes (as MLX masks only edge and diagonal tiles): a tile of query
// rows [i0, i1) and keys [j0, j1) is *fully visible* when every row may attend
// to every key under lengths, causal and window; its logits need no
// per-element span checks. Row spans' begins and ends are non-decreasing in
// the row, so the last row's begin and the first row's end decide. A tile
// with a row at or past q_valid or a key at or past kv_valid is not (those
// entries are masked). Fully hidden tiles never run (the block spans above
// end the loops before them); everything else is an edge tile, checked per
// element. Bias, bool mask, softcap and segment ids are per-element work on
// every tile (the kernels add them to the class: mfa_tile_visible).
inline bool mfa_tile_fully_visible(mfa_int i0, mfa_int i1, mfa_int j0, mfa_int j1,
                                   mfa_int q_valid, mfa_int kv_valid, mfa_int causal,
                                   mfa_int window_left, mfa_int window_right) {
  if (i0 >= i1 || j0 >= j1 || i0 < 0 || j0 < 0 || i1 > q_valid) return false;
  const MfaSpan first = mfa_key_span(i0, q_valid, kv_valid, causal, window_left, window_right);
  const MfaSpan last = mfa_key_span(i1 - 1, q_valid, kv_valid, causal, window_left, window_right);
  return last.begin <= j0 && first.end >= j1;
}

#endif  // JAX_MFA_METAL_ATTENTION_PARAMS_H

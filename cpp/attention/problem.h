// The attention problem every backend solves: shapes, static options, the
// broadcast layout of bias and mask, and the masking rules.
//
// The FFI handlers decode XLA's buffers and attributes into an AttentionProblem
// once; the CPU kernels, the Metal host and the Metal emulator all read the same
// description, so the semantics live in exactly one place.
#pragma once

#include <algorithm>
#include <cstdint>

namespace jax_mfa {

// Bias or mask, given with a 4-D shape whose dims are each 1 or the full
// (B, N, T, S). Broadcast dims get stride 0, so nothing is ever expanded.
struct BroadcastOperand {
  bool present = false;
  int64_t dims[4] = {1, 1, 1, 1};     // (B, N, T, S) as given
  int64_t strides[4] = {0, 0, 0, 0};  // element strides, 0 where broadcast

  // Sets dims and row-major strides; returns false if a dim is neither 1 nor full.
  bool set_shape(const int64_t* given, const int64_t* full) {
    present = true;
    int64_t stride = 1;
    for (int d = 3; d >= 0; --d) {
      if (given[d] != 1 && given[d] != full[d]) return false;
      dims[d] = given[d];
      strides[d] = given[d] == 1 ? 0 : stride;
      stride *= given[d];
    }
    return true;
  }
  int64_t offset(int64_t b, int64_t n, int64_t i, int64_t j) const {
    return b * strides[0] + n * strides[1] + i * strides[2] + j * strides[3];
  }
  int64_t size() const { return dims[0] * dims[1] * dims[2] * dims[3]; }
};

// Half-open range [begin, end) of key (or query) positions.
struct Span {
  int64_t begin = 0, end = 0;
  bool empty() const { return begin >= end; }
};

struct AttentionProblem {
  // query (B, T, N, H); key and value (B, S, K, H); N % K == 0.
  int64_t batch = 0, q_len = 0, kv_len = 0, q_heads = 0, kv_heads = 0, head_dim = 0;

  double scale = 1.0;
  double softcap = 0.0;  // 0: off; otherwise logits = softcap * tanh(logits / softcap)
  bool causal = false;   // top-left aligned: query i sees keys j <= i
  int64_t window_left = -1, window_right = -1;  // -1: unbounded on that side
  bool has_q_lengths = false, has_kv_lengths = false;
  BroadcastOperand bias, mask;

  // Packed sequences: key j is allowed for query i only if their segment ids
  // (q_segments (B, T), kv_segments (B, S), int32) are equal. No gradient.
  bool has_segment_ids = false;
  // Attention sinks: one logit per query head, (sinks_batch, N) with
  // sinks_batch 1 (shared) or B, accumulation dtype. Each row's softmax gets
  // the extra term exp(sink); the lse includes it.
  bool has_sinks = false;
  int64_t sinks_batch = 1;
  // Dropout on the probabilities (metal/dropout_philox.h): entries whose word
  // is below dropout_threshold are dropped, kept ones scaled by
  // 1 / (1 - dropout_rate). dropout_seed (B, 6) uint32 holds per batch row the
  // two key words and the counter origin (MfaDropoutSeed); with
  // dropout_broadcast_heads every head uses head index 0 (one mask per batch row).
  double dropout_rate = 0.0;
  uint32_t dropout_threshold = 0;
  bool dropout_broadcast_heads = false;
  bool has_dropout() const { return dropout_rate > 0.0; }
  double dropout_keep_scale() const { return 1.0 / (1.0 - dropout_rate); }

  int64_t group_size() const { return q_heads / kv_heads; }
  int64_t kv_head_of(int64_t n) const { return n / group_size(); }

  // Valid prefix lengths of batch b (the whole sequence without length inputs).
  int64_t q_valid(const int32_t* q_lengths, int64_t b) const {
    return has_q_lengths ? std::clamp<int64_t>(q_lengths[b], 0, q_len) : q_len;
  }
  int64_t kv_valid(const int32_t* kv_lengths, int64_t b) const {
    return has_kv_lengths ? std::clamp<int64_t>(kv_lengths[b], 0, kv_len) : kv_len;
  }

  // Sink logit of query head n in batch row b (natural-log units).
  template <typename Acc>
  Acc sink(const Acc* sinks, int64_t b, int64_t n) const {
    return sinks[(sinks_batch == 1 ? 0 : b) * q_heads + n];
  }

  // Keys that query row i may attend to under the structural masks (lengths,
  // causal, window). The boolean mask can only remove keys from this span.
  // Both ends are non-decreasing in i, which the block spans below rely on.
  Span key_span(int64_t i, int64_t q_valid_len, int64_t kv_valid_len) const {
    if (i >= q_valid_len) return {0, 0};
    int64_t lo = 0, hi = kv_valid_len;
    if (causal) hi = std::min(hi, i + 1);
    if (window_left >= 0) lo = std::max(lo, i - window_left);
    if (window_right >= 0) hi = std::min(hi, i + window_right + 1);
    // A window may start past the last valid key: keep the span inside
    // [0, kv_valid_len] so the block spans below never reach past the keys.
    lo = std::min(lo, kv_valid_len);
    return {lo, std::max(lo, hi)};
  }

  // Keys any row of [i0, i1) may attend to: a tile outside it is skipped.
  Span key_span_of_rows(int64_t i0, int64_t i1, int64_t q_valid_len,
                        int64_t kv_valid_len) const {
    i1 = std::min(i1, q_valid_len);
    if (i0 >= i1) return {0, 0};
    Span first = key_span(i0, q_valid_len, kv_valid_len);
    Span last = key_span(i1 - 1, q_valid_len, kv_valid_len);
    return {first.begin, std::max(first.begin, last.end)};
  }

  // Query rows that may attend to any key of [j0, j1): the inverse of the above.
  Span query_span_of_keys(int64_t j0, int64_t j1, int64_t q_valid_len,
                          int64_t kv_valid_len) const {
    j1 = std::min(j1, kv_valid_len);
    if (j0 >= j1) return {0, 0};
    int64_t lo = 0, hi = q_valid_len;
    if (causal) lo = std::max(lo, j0);
    if (window_right >= 0) lo = std::max(lo, j0 - window_right);
    if (window_left >= 0) hi = std::min(hi, j1 + window_left);
    return {lo, std::max(lo, hi)};
  }
};

// Segment-id tile skipping. A tile of queries [i0, i1) x keys [j0, j1) can
// only hold allowed entries among the keys whose id lies within the queries'
// [min, max] id range; narrow_to_ids keeps the first to last such key (the
// whole matching run for sorted, packed ids; a conservative superset for any
// others). Empty when no key of the range can match.
struct IdRange {
  int32_t lo, hi;
};
inline IdRange id_range(const int32_t* ids, int64_t begin, int64_t end) {
  const auto [lo, hi] = std::minmax_element(ids + begin, ids + end);
  return {*lo, *hi};
}
inline Span narrow_to_ids(const int32_t* ids, int64_t begin, int64_t end, IdRange r) {
  while (begin < end && (ids[begin] < r.lo || ids[begin] > r.hi)) ++begin;
  while (end > begin && (ids[end - 1] < r.lo || ids[end - 1] > r.hi)) --end;
  return {begin, end};
}

}  // namespace jax_mfa

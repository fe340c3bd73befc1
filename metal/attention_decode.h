// Split-key decode: the forward pass for a few queries (T <= 8) over many
// keys. The forward kernel would launch one threadgroup per (batch, head,
// 16 queries) -- B*N threadgroups for T = 1, most of the GPU idle at any S.
// Here the keys are split across threadgroups and the partial softmaxes are
// merged afterwards (the "lse merge"), as MLX's two-pass sdpa_vector does:
//
//   attention_decode_partial: one simdgroup per (batch, kv head, 8 rows of the
//     GQA group's T x G (query, head) rows, key split). Q.K^T and P.V with
//     K and V read straight from device memory into simdgroup matrices (one
//     simdgroup per threadgroup: nothing to share, so no threadgroup memory
//     and no barriers); writes the split's unnormalised O, running max m and
//     sum l per row.
//   attention_decode_merge: one threadgroup per output row: M = max m_s,
//     l = sum l_s 2^(m_s - M), O = sum O_s 2^(m_s - M) / l, lse = (M + log2 l) ln 2.
//
// Every logit rule (scale, softcap, bias, bool mask, causal, window,
// lengths) comes from mfa_logit / the span functions, as in the forward
// kernel, so both paths give the same results. Design notes: docs/metal.md.
#ifndef JAX_MFA_METAL_ATTENTION_DECODE_H
#define JAX_MFA_METAL_ATTENTION_DECODE_H

#ifndef JAX_MFA_EMBEDDED
#include "attention_kernels.h"
#endif

// 8x8 block of K^T: rows are head-dim columns d0.., columns keys key0..; the
// lane's two elements are K[key0 + lc + e][d0 + lr]. Keys at or past key_end
// and head columns at or past H read as zero.
template <typename T>
METAL_FUNC void mfa_load_keys_transposed(thread mfa_operand_mat<T>& m, device const T* k_base,
                                         mfa_long stride, int key0, int key_end, int d, int H,
                                         int lc) {
  typedef typename MfaOperand<T>::type U;
  for (int e = 0; e < 2; ++e) {
    const int j = key0 + lc + e;
    m.thread_elements()[e] =
        (j < key_end && d < H) ? mfa_operand(T(k_base[mfa_long(j) * stride + d])) : U(0.0f);
  }
}

template <typename T, int HP, int C>
[[kernel, max_total_threads_per_threadgroup(32)]] void attention_decode_partial(
    constant AttentionParams& p [[buffer(0)]], device const T* q [[buffer(1)]],
    device const T* k [[buffer(2)]], device const T* v [[buffer(3)]],
    device const float* bias [[buffer(4)]], device const uchar* mask [[buffer(5)]],
    device const int* q_lengths [[buffer(6)]], device const int* kv_lengths [[buffer(7)]],
    device float* partial_o [[buffer(8)]], device float* partial_m [[buffer(9)]],
    device float* partial_l [[buffer(10)]], uint group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  constexpr int HB = HP / 8, CB = C / 8;
  constexpr bool kCacheQ = mfa_decode_caches_q(HP);
  const int splits = p.decode_splits;
  const int linear = p.group_offset + int(group);
  const int split = linear % splits;
  const int tile = (linear / splits) % p.num_row_blocks;
  const int kvh = (linear / (splits * p.num_row_blocks)) % p.kv_heads;
  const int b = linear / (splits * p.num_row_blocks * p.kv_heads);
  const int H = p.head_dim, N = p.q_heads, K = p.kv_heads, G = p.group_size, TQ = p.q_len;
  const int q_valid = mfa_valid_len(q_lengths, p.has_q_lengths, b, p.q_len);
  const int kv_valid = mfa_valid_len(kv_lengths, p.has_kv_lengths, b, p.kv_len);

  // This lane's row: (query head g of the group, query t), r = g * T + t.
  const int lr = mfa_lane_row(lane), lc = mfa_lane_col(lane);
  const int r = tile * 8 + lr;
  const bool row_ok = r < TQ * G;
  const int t = row_ok ? r % TQ : 0;
  const int n = kvh * G + (row_ok ? r / TQ : 0);
  const mfa_long row_index = (mfa_long(b) * TQ + t) * N + n;

  // Keys of this split that any query may attend to; each row's own span is
  // cut to the split so that no key is counted by two splits.
  const MfaSpan all = mfa_key_span_of_rows(0, TQ, q_valid, kv_valid, p.causal, p.window_left,
                                           p.window_right);
  const int lo = max(all.begin, split * p.decode_keys_per_split);
  const int hi = min(all.end, (split + 1) * p.decode_keys_per_split);
  MfaSpan keys = mfa_key_span(t, q_valid, kv_valid, p.causal, p.window_left, p.window_right);
  keys.begin = max(keys.begin, lo);
  keys.end = min(keys.end, hi);
  const MfaLogitLine line = mfa_logit_line(p, b, n, t, 0, true);

  device const T* q_row = q + row_index * H;
  const mfa_long kv_stride = mfa_long(K) * H;
  device const T* k_head = k + mfa_long(b) * p.kv_len * kv_stride + mfa_long(kvh) * H;
  device const T* v_head = v + mfa_long(b) * p.kv_len * kv_stride + mfa_long(kvh) * H;

  mfa_mat O[HB];
  mfa_operand_mat<T> Qc[kCacheQ ? HB : 1];
#pragma clang loop unroll(full)
  for (int h = 0; h < HB; ++h) {
    O[h] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    if (kCacheQ) mfa_load_rows(Qc[kCacheQ ? h : 0], q_row, row_ok, h * 8 + lc, H);
  }

  float m = kMaskedLogit, l = 0.0f;
  for (int j0 = lo; j0 < hi; j0 += C) {
    // S = Q K^T, K^T read from device memory block by block.
    mfa_mat S[CB];
#pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) S[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
#pragma clang loop unroll(full)
    for (int kk = 0; kk < HB; ++kk) {
      mfa_operand_mat<T> am;
      if (kCacheQ) am = Qc[kCacheQ ? kk : 0];
      else mfa_load_rows(am, q_row, row_ok, kk * 8 + lc, H);
#pragma clang loop unroll(full)
      for (int c = 0; c < CB; ++c) {
        mfa_operand_mat<T> bt;
        mfa_load_keys_transposed(bt, k_head, kv_stride, j0 + c * 8, hi, kk * 8 + lr, H, lc);
        simdgroup_multiply_accumulate(S[c], am, bt, S[c]);
      }
    }

    // Logit rules and the online softmax in base 2, as in attention_forward;
    // the rules run per element only where the tile needs them (a whole step
    // of keys inside the split that every query attends to is visible).
    const bool visible = j0 + C <= hi && mfa_tile_visible(p, 0, TQ, j0, j0 + C, q_valid, kv_valid);
    float block_max = kMaskedLogit;
    bool ok[CB][2];
#pragma clang loop unroll(full)
    for (int c = 0; c < CB; ++c) {
      for (int e = 0; e < 2; ++e) {
        float tanh_unused;
        bool valid;
        const int j = j0 + c * 8 + lc + e;
        // No segment ids here (use_decode): the segment check passes.
        const float x = mfa_tile_logit(p, visible, bias, mask, nullptr, nullptr, line, j, b, t, j,
                                       keys, S[c].thread_elements()[e], valid, tanh_unused);
        ok[c][e] = valid && row_ok;
        S[c].thread_elements()[e] = x;
        if (ok[c][e]) block_max = max(block_max, x);
      }
    }
    const float alpha = mfa_softmax_step<CB>(S, &ok[0][0], block_max, m, l);

    // O = alpha O + P V, V read from device memory (rows keys, columns head dim).
#pragma clang loop unroll(full)
    for (int h = 0; h < HB; ++h) {
      O[h].thread_elements()[0] *= alpha;
      O[h].thread_elements()[1] *= alpha;
#pragma clang loop unroll(full)
      for (int c = 0; c < CB; ++c) {
        mfa_operand_mat<T> vm;
        const int j = j0 + c * 8 + lr;
        mfa_load_rows(vm, v_head + mfa_long(min(j, p.kv_len - 1)) * kv_stride, j < hi, h * 8 + lc, H);
        simdgroup_multiply_accumulate(O[h], S[c], vm, O[h]);
      }
    }
  }

  // This split's partial row: unnormalised O, m and l.
  const mfa_long slot = row_index * splits + split;
  if (row_ok) {
#pragma clang loop unroll(full)
    for (int h = 0; h < HB; ++h) {
      for (int e = 0; e < 2; ++e) {
        const int d = h * 8 + lc + e;
        if (d < H) partial_o[slot * H + d] = O[h].thread_elements()[e];
      }
    }
    if ((lane & 9u) == 0u) {
      partial_m[slot] = m;
      partial_l[slot] = l;
    }
  }
}

// One threadgroup of 32 threads per output row (b, t, n): merges the splits'
// partial softmaxes. A row no split allowed a key gets zeros and lse = -inf
// (its bit pattern: no infinity constant); a NaN logit left l NaN, which
// propagates into out and lse as in the forward kernel.
template <typename T>
[[kernel, max_total_threads_per_threadgroup(32)]] void attention_decode_merge(
    constant AttentionParams& p [[buffer(0)]], device const float* partial_o [[buffer(1)]],
    device const float* partial_m [[buffer(2)]], device const float* partial_l [[buffer(3)]],
    device T* out [[buffer(4)]], device float* lse [[buffer(5)]],
    uint group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float weight[MFA_MAX_DECODE_SPLITS];  // 2^(m_s - M) of every split
  const int splits = p.decode_splits, H = p.head_dim;
  const mfa_long row_index = mfa_long(p.group_offset) + mfa_long(group);
  device const float* m_row = partial_m + row_index * splits;
  device const float* l_row = partial_l + row_index * splits;
  float M = kMaskedLogit;
  for (int s = 0; s < splits; ++s) M = max(M, m_row[s]);
  for (int s = int(tid); s < splits; s += 32) weight[s] = exp2(m_row[s] - M);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) l += l_row[s] * weight[s];
  const bool empty = l == 0.0f;
  const float inv = empty ? 0.0f : 1.0f / l;
  for (int d = int(tid); d < H; d += 32) {
    float o = 0.0f;
    for (int s = 0; s < splits; ++s) o += partial_o[(row_index * splits + s) * H + d] * weight[s];
    out[row_index * H + d] = mfa_from_float<T>(o * inv);
  }
  if (tid == 0) lse[row_index] = empty ? as_type<float>(0xff800000u) : (M + log2(l)) * kLn2;
}

#endif  // JAX_MFA_METAL_ATTENTION_DECODE_H

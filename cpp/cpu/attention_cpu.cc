// Fused FlashAttention on the CPU.
//
// Forward: one task per (batch, query head, query block); keys are streamed in
// blocks with an online softmax, so the T x S score matrix never exists.
// Backward (no atomics, as in metal-flash-attention): pass A owns query blocks
// and computes dQ; pass B owns key blocks and computes dK, dV (summing the
// query heads of a GQA group) and the bias gradient. Both recompute the
// probabilities from the saved logsumexp.
#include "cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/half_types.h"

namespace jax_mfa {
namespace {

// Storage types as they sit in XLA's buffers.
struct Half { uint16_t bits; };
struct BFloat { uint16_t bits; };

template <typename Acc> inline Acc to_acc(float x) { return x; }
template <typename Acc> inline Acc to_acc(double x) { return Acc(x); }
template <typename Acc> inline Acc to_acc(Half x) { return half_bits_to_float(x.bits); }
template <typename Acc> inline Acc to_acc(BFloat x) { return bfloat_bits_to_float(x.bits); }

template <typename T> inline T from_acc(float x);
template <> inline float from_acc<float>(float x) { return x; }
template <> inline Half from_acc<Half>(float x) { return {float_to_half_bits(x)}; }
template <> inline BFloat from_acc<BFloat>(float x) { return {float_to_bfloat_bits(x)}; }
template <typename T> inline T from_acc(double x) { return T(x); }

constexpr int64_t kBlockQ = 64;  // query rows per tile
constexpr int64_t kBlockK = 64;  // key columns per tile

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Reads and writes the (b, position, head, :) rows of a (B, L, heads, H) tensor.
template <typename T>
struct HeadRows {
  T* base;
  int64_t len, heads, dim;
  T* row(int64_t b, int64_t pos, int64_t head) const {
    return base + ((b * len + pos) * heads + head) * dim;
  }
};

// rows x H tile in Acc, converted once per tile (not per use).
template <typename Acc, typename T>
void load_rows(const HeadRows<const T>& src, int64_t b, int64_t pos0, int64_t rows, int64_t head,
               Acc* dst) {
  const int64_t H = src.dim;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src.row(b, pos0 + r, head);
    for (int64_t h = 0; h < H; ++h) dst[r * H + h] = to_acc<Acc>(s[h]);
  }
}

// Transposed: dst is H x ld, column r holds row r.
template <typename Acc, typename T>
void load_rows_transposed(const HeadRows<const T>& src, int64_t b, int64_t pos0, int64_t rows,
                          int64_t head, int64_t ld, Acc* dst) {
  const int64_t H = src.dim;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src.row(b, pos0 + r, head);
    for (int64_t h = 0; h < H; ++h) dst[h * ld + r] = to_acc<Acc>(s[h]);
  }
}

template <typename T, typename Acc>
void store_rows(const HeadRows<T>& dst, int64_t b, int64_t pos0, int64_t rows, int64_t head,
                const Acc* src) {
  const int64_t H = dst.dim;
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dst.row(b, pos0 + r, head);
    for (int64_t h = 0; h < H; ++h) d[h] = from_acc<T>(src[r * H + h]);
  }
}

// C[rows x cols] (+)= A[rows x H] * Bt[H x cols]; the inner loop is an axpy
// over contiguous columns so it vectorizes.
template <typename Acc>
void matmul_abt(const Acc* A, const Acc* Bt, int64_t rows, int64_t H, int64_t cols, int64_t ldb,
                Acc* C, int64_t ldc, bool accumulate) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc* c = C + r * ldc;
    if (!accumulate) std::fill(c, c + cols, Acc(0));
    const Acc* a = A + r * H;
    for (int64_t h = 0; h < H; ++h) {
      const Acc ah = a[h];
      const Acc* bt = Bt + h * ldb;
      for (int64_t j = 0; j < cols; ++j) c[j] += ah * bt[j];
    }
  }
}

// C[rows x H] += P[rows x cols] * V[cols x H].
template <typename Acc>
void matmul_pv(const Acc* P, int64_t ldp, const Acc* V, int64_t rows, int64_t cols, int64_t H,
               Acc* C) {
  for (int64_t r = 0; r < rows; ++r) {
    Acc* c = C + r * H;
    const Acc* p = P + r * ldp;
    for (int64_t j = 0; j < cols; ++j) {
      const Acc pj = p[j];
      if (pj == Acc(0)) continue;
      const Acc* v = V + j * H;
      for (int64_t h = 0; h < H; ++h) c[h] += pj * v[h];
    }
  }
}

// C[cols x H] += P[rows x cols]^T * X[rows x H].
template <typename Acc>
void matmul_ptx(const Acc* P, int64_t ldp, const Acc* X, int64_t rows, int64_t cols, int64_t H,
                Acc* C) {
  for (int64_t r = 0; r < rows; ++r) {
    const Acc* p = P + r * ldp;
    const Acc* x = X + r * H;
    for (int64_t j = 0; j < cols; ++j) {
      const Acc pj = p[j];
      if (pj == Acc(0)) continue;
      Acc* c = C + j * H;
      for (int64_t h = 0; h < H; ++h) c[h] += pj * x[h];
    }
  }
}

// Everything a tile needs to turn raw q.k products into masked logits.
template <typename Acc>
struct LogitRules {
  const AttentionProblem& p;
  const Acc* bias;
  const bool* mask;
  int64_t q_valid, kv_valid;

  // Overwrites S[rows x cols] (raw q.k for rows i0.., keys j0..) with the final
  // logits; disallowed entries become -inf. tanh_out (optional) keeps the
  // softcap's tanh for the backward's chain rule.
  void apply(int64_t b, int64_t n, int64_t i0, int64_t rows, int64_t j0, int64_t cols, Acc* S,
             int64_t lds, Acc* tanh_out) const {
    const Acc scale = Acc(p.scale), cap = Acc(p.softcap);
    const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      Acc* s = S + r * lds;
      const Span keys = p.key_span(i, q_valid, kv_valid);
      for (int64_t c = 0; c < cols; ++c) s[c] *= scale;
      if (cap > 0) {
        Acc* t = tanh_out + r * lds;
        for (int64_t c = 0; c < cols; ++c) {
          t[c] = std::tanh(s[c] / cap);
          s[c] = cap * t[c];
        }
      }
      if (bias) {
        const Acc* brow = bias + p.bias.offset(b, n, i, 0);
        const int64_t bs = p.bias.strides[3];
        for (int64_t c = 0; c < cols; ++c) s[c] += brow[(j0 + c) * bs];
      }
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t j = j0 + c;
        if (j < keys.begin || j >= keys.end) s[c] = neg_inf;
      }
      if (mask) {
        const bool* mrow = mask + p.mask.offset(b, n, i, 0);
        const int64_t ms = p.mask.strides[3];
        for (int64_t c = 0; c < cols; ++c)
          if (!mrow[(j0 + c) * ms]) s[c] = neg_inf;
      }
    }
  }
};

template <typename T, typename Acc>
void forward_typed(const AttentionProblem& p, const ForwardBuffers& buf, TaskRunner& runner) {
  const int64_t B = p.batch, T_ = p.q_len, S_ = p.kv_len, N = p.q_heads, K = p.kv_heads,
                H = p.head_dim;
  const HeadRows<const T> q{static_cast<const T*>(buf.q), T_, N, H};
  const HeadRows<const T> k{static_cast<const T*>(buf.k), S_, K, H};
  const HeadRows<const T> v{static_cast<const T*>(buf.v), S_, K, H};
  const HeadRows<T> out{static_cast<T*>(buf.out), T_, N, H};
  Acc* lse = static_cast<Acc*>(buf.lse);
  const int64_t q_blocks = ceil_div(T_, kBlockQ);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();

  parallel_for(runner, B * N * q_blocks, [&](int64_t task) {
    const int64_t qb = task % q_blocks, n = (task / q_blocks) % N, b = task / (q_blocks * N);
    const int64_t kvh = p.kv_head_of(n);
    const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, T_ - i0);
    const LogitRules<Acc> rules{p, static_cast<const Acc*>(buf.bias), buf.mask,
                                p.q_valid(buf.q_lengths, b), p.kv_valid(buf.kv_lengths, b)};
    const Span span = p.key_span_of_rows(i0, i0 + rows, rules.q_valid, rules.kv_valid);

    std::vector<Acc> Q(rows * H), Kt(H * kBlockK), V(kBlockK * H), S(rows * kBlockK),
        tanh_buf(p.softcap > 0 ? rows * kBlockK : 0), acc(rows * H, Acc(0));
    std::vector<Acc> m(rows, neg_inf), l(rows, Acc(0));
    if (!span.empty()) load_rows(q, b, i0, rows, n, Q.data());

    for (int64_t j0 = span.begin; j0 < span.end; j0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, span.end - j0);
      load_rows_transposed(k, b, j0, cols, kvh, kBlockK, Kt.data());
      load_rows(v, b, j0, cols, kvh, V.data());
      matmul_abt(Q.data(), Kt.data(), rows, H, cols, kBlockK, S.data(), kBlockK, false);
      rules.apply(b, n, i0, rows, j0, cols, S.data(), kBlockK, tanh_buf.data());
      // Online softmax: rescale what was accumulated when the running max grows.
      for (int64_t r = 0; r < rows; ++r) {
        Acc* s = S.data() + r * kBlockK;
        Acc row_max = m[r];
        for (int64_t c = 0; c < cols; ++c) row_max = std::max(row_max, s[c]);
        if (row_max == neg_inf) {  // nothing allowed yet in this row
          std::fill(s, s + cols, Acc(0));
          continue;
        }
        const Acc alpha = std::exp(m[r] - row_max);
        Acc sum = 0;
        for (int64_t c = 0; c < cols; ++c) {
          s[c] = std::exp(s[c] - row_max);
          sum += s[c];
        }
        l[r] = l[r] * alpha + sum;
        m[r] = row_max;
        if (alpha != Acc(1))
          for (int64_t h = 0; h < H; ++h) acc[r * H + h] *= alpha;
      }
      matmul_pv(S.data(), kBlockK, V.data(), rows, cols, H, acc.data());
    }
    for (int64_t r = 0; r < rows; ++r) {
      const bool empty = l[r] == Acc(0);  // no allowed key: zeros, lse = -inf
      const Acc inv = empty ? Acc(0) : Acc(1) / l[r];
      for (int64_t h = 0; h < H; ++h) acc[r * H + h] *= inv;
      lse[(b * T_ + i0 + r) * N + n] = empty ? neg_inf : m[r] + std::log(l[r]);
    }
    store_rows(out, b, i0, rows, n, acc.data());
  });
}

// Recomputes one tile of the backward: P from lse, dP = dO V^T,
// dS = P * (dP - delta) (the gradient of the post-bias logits) and dQK, the
// gradient of the raw q.k products (chain rule through softcap and scale).
template <typename Acc>
struct BackwardTile {
  int64_t H;
  std::vector<Acc> P, dS, dQK, tanh_buf;
  BackwardTile(int64_t rows, int64_t H, bool softcap)
      : H(H), P(rows * kBlockK), dS(rows * kBlockK), dQK(rows * kBlockK),
        tanh_buf(softcap ? rows * kBlockK : 0) {}

  // Q, dO: rows x H; Kt, Vt: H x kBlockK; all tiles have row stride kBlockK.
  void compute(const LogitRules<Acc>& rules, int64_t b, int64_t n, int64_t i0, int64_t rows,
               int64_t j0, int64_t cols, const Acc* Q, const Acc* dO, const Acc* Kt,
               const Acc* Vt, const Acc* lse, const Acc* delta) {
    const AttentionProblem& p = rules.p;
    matmul_abt(Q, Kt, rows, H, cols, kBlockK, P.data(), kBlockK, false);
    rules.apply(b, n, i0, rows, j0, cols, P.data(), kBlockK, tanh_buf.data());
    matmul_abt(dO, Vt, rows, H, cols, kBlockK, dQK.data(), kBlockK, false);  // dP for now
    const Acc scale = Acc(p.scale);
    for (int64_t r = 0; r < rows; ++r) {
      Acc* prob = P.data() + r * kBlockK;
      Acc* ds = dS.data() + r * kBlockK;
      Acc* dqk = dQK.data() + r * kBlockK;
      const Acc row_lse = lse[r];
      for (int64_t c = 0; c < cols; ++c) {
        // Masked logits (-inf) and empty rows (lse = -inf) get probability 0.
        prob[c] = prob[c] == -std::numeric_limits<Acc>::infinity() ? Acc(0)
                                                                   : std::exp(prob[c] - row_lse);
        ds[c] = prob[c] * (dqk[c] - delta[r]);
        dqk[c] = ds[c] * scale;
      }
      if (p.softcap > 0) {
        const Acc* t = tanh_buf.data() + r * kBlockK;
        for (int64_t c = 0; c < cols; ++c) dqk[c] *= Acc(1) - t[c] * t[c];
      }
    }
  }
};

template <typename T, typename Acc>
void backward_typed(const AttentionProblem& p, const BackwardBuffers& buf, TaskRunner& runner) {
  const int64_t B = p.batch, T_ = p.q_len, S_ = p.kv_len, N = p.q_heads, K = p.kv_heads,
                H = p.head_dim, G = p.group_size();
  const HeadRows<const T> q{static_cast<const T*>(buf.q), T_, N, H};
  const HeadRows<const T> k{static_cast<const T*>(buf.k), S_, K, H};
  const HeadRows<const T> v{static_cast<const T*>(buf.v), S_, K, H};
  const HeadRows<const T> dout{static_cast<const T*>(buf.dout), T_, N, H};
  const HeadRows<T> dq{static_cast<T*>(buf.dq), T_, N, H};
  const HeadRows<T> dk{static_cast<T*>(buf.dk), S_, K, H};
  const HeadRows<T> dv{static_cast<T*>(buf.dv), S_, K, H};
  const Acc* lse_all = static_cast<const Acc*>(buf.lse);
  const Acc* delta_all = static_cast<const Acc*>(buf.delta);
  const Acc* bias = static_cast<const Acc*>(buf.bias);
  Acc* dbias = static_cast<Acc*>(buf.dbias);
  const bool softcap = p.softcap > 0;
  const int64_t q_blocks = ceil_div(T_, kBlockQ), k_blocks = ceil_div(S_, kBlockK);

  // The bias gradient sums dS over the dims the bias is broadcast along. When
  // the bias varies along keys, pass B owns it (its tasks own key columns);
  // when it is constant along keys, pass A records per-row sums of dS instead.
  const bool dbias_in_pass_b = bias && p.bias.dims[3] == p.kv_len;
  std::vector<Acc> dbias_rows(bias && !dbias_in_pass_b ? B * N * T_ : 0, Acc(0));

  auto gather = [&](int64_t b, int64_t n, int64_t i0, int64_t rows, Acc* lse, Acc* delta) {
    for (int64_t r = 0; r < rows; ++r) {
      lse[r] = lse_all[(b * T_ + i0 + r) * N + n];
      delta[r] = delta_all[(b * T_ + i0 + r) * N + n];
    }
  };

  // Pass A: dQ, one task per (batch, query head, query block).
  parallel_for(runner, B * N * q_blocks, [&](int64_t task) {
    const int64_t qb = task % q_blocks, n = (task / q_blocks) % N, b = task / (q_blocks * N);
    const int64_t kvh = p.kv_head_of(n);
    const int64_t i0 = qb * kBlockQ, rows = std::min(kBlockQ, T_ - i0);
    const LogitRules<Acc> rules{p, bias, buf.mask, p.q_valid(buf.q_lengths, b),
                                p.kv_valid(buf.kv_lengths, b)};
    const Span span = p.key_span_of_rows(i0, i0 + rows, rules.q_valid, rules.kv_valid);
    std::vector<Acc> Q(rows * H), dO(rows * H), Kb(kBlockK * H), Kt(H * kBlockK),
        Vt(H * kBlockK), dQ(rows * H, Acc(0)), lse(rows), delta(rows), row_sums(rows, Acc(0));
    BackwardTile<Acc> tile(rows, H, softcap);
    if (!span.empty()) {
      load_rows(q, b, i0, rows, n, Q.data());
      load_rows(dout, b, i0, rows, n, dO.data());
      gather(b, n, i0, rows, lse.data(), delta.data());
    }
    for (int64_t j0 = span.begin; j0 < span.end; j0 += kBlockK) {
      const int64_t cols = std::min(kBlockK, span.end - j0);
      load_rows(k, b, j0, cols, kvh, Kb.data());
      load_rows_transposed(k, b, j0, cols, kvh, kBlockK, Kt.data());
      load_rows_transposed(v, b, j0, cols, kvh, kBlockK, Vt.data());
      tile.compute(rules, b, n, i0, rows, j0, cols, Q.data(), dO.data(), Kt.data(), Vt.data(),
                   lse.data(), delta.data());
      matmul_pv(tile.dQK.data(), kBlockK, Kb.data(), rows, cols, H, dQ.data());
      if (!dbias_rows.empty())
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) row_sums[r] += tile.dS[r * kBlockK + c];
    }
    store_rows(dq, b, i0, rows, n, dQ.data());
    if (!dbias_rows.empty())
      for (int64_t r = 0; r < rows; ++r) dbias_rows[(b * N + n) * T_ + i0 + r] = row_sums[r];
  });

  // Pass B: dK, dV (and dbias), one task per key block and per (batch, kv
  // head) -- except that batches or kv heads the bias is broadcast along share
  // a task, so each dbias element has exactly one writer.
  const bool merge_batches = dbias_in_pass_b && p.bias.dims[0] == 1;
  const bool merge_heads = dbias_in_pass_b && p.bias.dims[1] == 1;
  const int64_t b_tasks = merge_batches ? 1 : B, h_tasks = merge_heads ? 1 : K;
  if (dbias_in_pass_b) {
    // Zero this pass's dbias columns up front; tasks only accumulate.
    std::fill(dbias, dbias + p.bias.size(), Acc(0));
  }
  parallel_for(runner, b_tasks * h_tasks * k_blocks, [&](int64_t task) {
    const int64_t kb = task % k_blocks, ht = (task / k_blocks) % h_tasks,
                  bt = task / (k_blocks * h_tasks);
    const int64_t j0 = kb * kBlockK, cols = std::min(kBlockK, S_ - j0);
    std::vector<Acc> Kt(H * kBlockK), Vt(H * kBlockK), Q(kBlockQ * H), dO(kBlockQ * H),
        dK(kBlockK * H), dV(kBlockK * H), lse(kBlockQ), delta(kBlockQ);
    BackwardTile<Acc> tile(kBlockQ, H, softcap);
    const int64_t b_begin = merge_batches ? 0 : bt, b_end = merge_batches ? B : bt + 1;
    const int64_t h_begin = merge_heads ? 0 : ht, h_end = merge_heads ? K : ht + 1;
    for (int64_t b = b_begin; b < b_end; ++b) {
      const LogitRules<Acc> rules{p, bias, buf.mask, p.q_valid(buf.q_lengths, b),
                                  p.kv_valid(buf.kv_lengths, b)};
      const Span rows_span = p.query_span_of_keys(j0, j0 + cols, rules.q_valid, rules.kv_valid);
      for (int64_t kvh = h_begin; kvh < h_end; ++kvh) {
        std::fill(dK.begin(), dK.end(), Acc(0));
        std::fill(dV.begin(), dV.end(), Acc(0));
        if (!rows_span.empty()) {
          load_rows_transposed(k, b, j0, cols, kvh, kBlockK, Kt.data());
          load_rows_transposed(v, b, j0, cols, kvh, kBlockK, Vt.data());
        }
        for (int64_t n = kvh * G; n < (kvh + 1) * G && !rows_span.empty(); ++n) {
          for (int64_t i0 = rows_span.begin; i0 < rows_span.end; i0 += kBlockQ) {
            const int64_t rows = std::min(kBlockQ, rows_span.end - i0);
            load_rows(q, b, i0, rows, n, Q.data());
            load_rows(dout, b, i0, rows, n, dO.data());
            gather(b, n, i0, rows, lse.data(), delta.data());
            tile.compute(rules, b, n, i0, rows, j0, cols, Q.data(), dO.data(), Kt.data(),
                         Vt.data(), lse.data(), delta.data());
            matmul_ptx(tile.P.data(), kBlockK, dO.data(), rows, cols, H, dV.data());
            matmul_ptx(tile.dQK.data(), kBlockK, Q.data(), rows, cols, H, dK.data());
            if (dbias_in_pass_b)
              for (int64_t r = 0; r < rows; ++r) {
                Acc* d = dbias + p.bias.offset(merge_batches ? 0 : b, merge_heads ? 0 : n, i0 + r, j0);
                for (int64_t c = 0; c < cols; ++c) d[c] += tile.dS[r * kBlockK + c];
              }
          }
        }
        store_rows(dk, b, j0, cols, kvh, dK.data());
        store_rows(dv, b, j0, cols, kvh, dV.data());
      }
    }
  });

  if (!dbias_rows.empty()) {
    // Bias constant along keys: reduce the per-row sums over broadcast dims.
    std::fill(dbias, dbias + p.bias.size(), Acc(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < T_; ++i)
          dbias[p.bias.offset(b, n, i, 0)] += dbias_rows[(b * N + n) * T_ + i];
  }
}

template <template <typename, typename> class Fn, typename Buffers>
Status dispatch_dtype(DType dtype, const AttentionProblem& p, const Buffers& b, TaskRunner& r) {
  switch (dtype) {
    case DType::F32: Fn<float, float>::run(p, b, r); return Status::Ok();
    case DType::F16: Fn<Half, float>::run(p, b, r); return Status::Ok();
    case DType::BF16: Fn<BFloat, float>::run(p, b, r); return Status::Ok();
    case DType::F64: Fn<double, double>::run(p, b, r); return Status::Ok();
  }
  return Status::Error("unsupported dtype");
}

template <typename T, typename Acc>
struct Forward {
  static void run(const AttentionProblem& p, const ForwardBuffers& b, TaskRunner& r) {
    forward_typed<T, Acc>(p, b, r);
  }
};
template <typename T, typename Acc>
struct Backward {
  static void run(const AttentionProblem& p, const BackwardBuffers& b, TaskRunner& r) {
    backward_typed<T, Acc>(p, b, r);
  }
};

}  // namespace

Status cpu_attention_forward(const AttentionProblem& p, DType dtype, const ForwardBuffers& b,
                             TaskRunner& runner) {
  return dispatch_dtype<Forward>(dtype, p, b, runner);
}

Status cpu_attention_backward(const AttentionProblem& p, DType dtype, const BackwardBuffers& b,
                              TaskRunner& runner) {
  return dispatch_dtype<Backward>(dtype, p, b, runner);
}

}  // namespace jax_mfa

// Fused FlashAttention on the CPU.
//
// Tile products go through a single-threaded BLAS GEMM (cpu_blas.h); the
// softmax row operations are vectorised with run-time CPU dispatch
// (cpu_simd.h). The query heads of a GQA group are stacked into one tile (row
// r = position * G + head-in-group), so they share the key/value tiles and
// decode-like calls still get tall GEMMs.
//
// Forward: one task per (batch, kv head, block of query positions) -- and,
// when that gives too few tasks to fill the cores (decoding), per slice of the
// key range, the slices being merged afterwards through their logsumexp. Keys
// are streamed in blocks with an online softmax; the T x S scores never exist.
//
// Backward (FlashAttention-2 style): one task per (batch, kv head, key block)
// owns dK, dV (and the key columns of dbias) for its keys, recomputes P from
// the saved logsumexp, and adds its share of dQ, one tile of rows at a time,
// into a float sum per head under a lock per block of query positions (held
// for the addition only). dK and dV have one writer each.
//
// bfloat16 on CPUs with AVX512-BF16 (use_bf16_dot): the operands are
// repacked (not converted) into bfloat16 pairs once per chunk of heads and all
// tile products run on the bfloat16 instructions (cpu_bf16.h: AMX-BF16 tiles
// where the CPU has them, else AVX512-BF16 dot products); P and dS are
// rounded to bfloat16 for the products that take them, softmax and
// accumulation stay in float. The float16 forward can take the same path
// (use_f16_split, opt-in: JAX_MFA_F16_SPLIT=1): every float16 operand is split
// exactly into bfloat16 hi + lo parts; Q K^T sums all four products of the
// parts, P V three (see qk_terms), P keeping 16 significant bits. Otherwise
// float16/bfloat16 inputs are converted to float: in the forward by each
// task, key block by key block; in the backward once per call (per chunk of
// heads). float64 runs in float64 throughout.
#include "cpu/attention_cpu.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "../../metal/dropout_philox.h"
#include "common/half_types.h"
#include "cpu/cpu_bf16.h"
#include "cpu/cpu_f32_tiles.h"
#include "cpu/cpu_blas.h"
#include "cpu/cpu_simd.h"

namespace jax_mfa {
namespace {

using cpu::gemm;
using cpu::RowOps;

// Storage types as they sit in XLA's buffers.
struct Half { uint16_t bits; };
struct BFloat { uint16_t bits; };

template <typename T> inline T from_acc(float x);
template <> inline float from_acc<float>(float x) { return x; }
template <> inline Half from_acc<Half>(float x) { return {float_to_half_bits(x)}; }
template <> inline BFloat from_acc<BFloat>(float x) { return {float_to_bfloat_bits(x)}; }
template <typename T> inline T from_acc(double x) { return T(x); }

// dst[0..n) = src[0..n) in the accumulation type.
inline void convert(const float* s, float* d, int64_t n, const RowOps&) {
  std::memcpy(d, s, n * sizeof(float));
}
inline void convert(const double* s, double* d, int64_t n, const RowOps&) {
  std::memcpy(d, s, n * sizeof(double));
}
inline void convert(const Half* s, float* d, int64_t n, const RowOps& ops) {
  ops.half_to_float(reinterpret_cast<const uint16_t*>(s), d, n);
}
inline void convert(const BFloat* s, float* d, int64_t n, const RowOps& ops) {
  ops.bfloat_to_float(reinterpret_cast<const uint16_t*>(s), d, n);
}

template <typename T, typename Acc>
inline void store(const Acc* s, T* d, int64_t n, Acc scale) {
  if constexpr (std::is_same_v<T, Half>) {
    cpu::row_ops().float_to_half(s, reinterpret_cast<uint16_t*>(d), n, scale);
  } else if constexpr (std::is_same_v<T, BFloat>) {
    cpu::row_ops().float_to_bfloat(s, reinterpret_cast<uint16_t*>(d), n, scale);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = from_acc<T>(s[i] * scale);
  }
}

// Softmax row operations: vectorised for float, plain loops for double.
inline float row_max(const float* x, int64_t n, const RowOps& o) { return o.max(x, n); }
inline float row_exp_sum(float* x, int64_t n, float sh, const RowOps& o) { return o.exp_sum(x, n, sh); }
inline void row_exp(float* x, int64_t n, float mul, float sh, const RowOps& o) { o.exp(x, n, mul, sh); }
inline void row_ds(const float* p, float* dp, int64_t n, float d, const RowOps& o) { o.ds(p, dp, n, d); }
inline void row_scale(float* y, int64_t n, float a, const RowOps& o) { o.scale(y, n, a); }
inline double row_max(const double* x, int64_t n, const RowOps&) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}
inline double row_exp_sum(double* x, int64_t n, double sh, const RowOps&) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - sh));
  return s;
}
inline void row_exp(double* x, int64_t n, double mul, double sh, const RowOps&) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i] * mul - sh);
}
inline void row_ds(const double* p, double* dp, int64_t n, double d, const RowOps&) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d);
}
inline void row_scale(double* y, int64_t n, double a, const RowOps&) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The bfloat16 dot-product path: for bfloat16 where the CPU has it, and only
// with enough stacked query rows per head (T * G) to pay for repacking keys
// and values (decoding keeps the float path, whose cost is the same pass).
// Segment ids, sinks and dropout take the float path: its softmax writes P
// as bfloat16 directly, with no place for the dropout factors.
template <typename T>
bool use_bf16_dot(const AttentionProblem& p, int64_t stacked_rows, const RowOps& ops) {
  return std::is_same_v<T, BFloat> && stacked_rows >= 64 && ops.exp_sum_to_bfloat &&
         !p.has_segment_ids && !p.has_sinks && !p.has_dropout() && cpu::bf16_dot_available();
}
// The float16 forward on the same instructions through hi/lo splits, under
// the same conditions (cpu_bf16.h: opt-in).
template <typename T>
bool use_f16_split(const AttentionProblem& p, int64_t stacked_rows) {
  return std::is_same_v<T, Half> && stacked_rows >= 64 && !p.has_segment_ids && !p.has_sinks &&
         !p.has_dropout() && cpu::f16_split_available();
}

// A B on the bfloat16 instructions (cpu::bf16_gemm's layouts). With split
// operands (A[1], B[1] the lo parts) the sum of `terms` products: 3 is
// A0 B0 + A0 B1 + A1 B0, 4 adds A1 B1.
void dot_product(int terms, int64_t M, int64_t N, int64_t pairs, float alpha,
                 const uint32_t* const A[2], int64_t lda, const uint32_t* const B[2], int64_t ldb,
                 bool accumulate, float* C, int64_t ldc) {
  const uint32_t* as[4] = {A[0], A[0], A[1], A[1]};
  const uint32_t* bs[4] = {B[0], B[1], B[0], B[1]};
  cpu::bf16_gemm_sum(M, N, pairs, alpha, terms, as, lda, bs, ldb, accumulate, C, ldc);
}

// A B operand of bf16_gemm (pair layout, stride = row stride in words) or of
// bf16_gemm_b_tiles (tile layout, stride = b_stride).
struct BWords {
  const uint32_t* words;
  int64_t stride;
};

// Tile shape: stacked query rows x key columns per tile. Overridable for
// tuning with JAX_MFA_TILES="fwd_rows,fwd_cols,bwd_rows,bwd_cols".
struct TileShape {
  int64_t rows, cols;
};
TileShape tile_shape(bool backward, int64_t H, TileShape dflt) {
  if (const char* env = std::getenv("JAX_MFA_TILES"); env && *env) {
    long v[4];
    if (std::sscanf(env, "%ld,%ld,%ld,%ld", &v[0], &v[1], &v[2], &v[3]) == 4)
      return backward ? TileShape{v[2], v[3]} : TileShape{v[0], v[1]};
  }
  return dflt;
}

// Stacked rows per strip of a forward tile: 16 on AMX with K^T and V in tile
// layout (`tiled`, see forward_typed), else the whole tile;
// JAX_MFA_DOT_STRIP=<rows> overrides it on every bfloat16-instruction path
// (for tuning, and so that tests run strips on any CPU).
int64_t dot_strip_rows(bool dot, bool tiled, int64_t tile_rows) {
  if (!dot) return tile_rows;
  if (const char* env = std::getenv("JAX_MFA_DOT_STRIP"); env && std::atoi(env) > 0)
    return std::min<int64_t>(tile_rows, std::atoi(env));
  return tiled ? std::min<int64_t>(tile_rows, 16) : tile_rows;
}

// ---------------------------------------------------------------------------
// The calling thread's CPU time where the OS reports it (Linux), else wall
// time: on a shared machine, CPU time keeps the rates independent of how
// long other processes hold the cores.
inline int64_t now_cpu_ns() {
#if defined(__linux__)
  timespec ts;
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
    return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
#endif
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Optional timing breakdown (JAX_MFA_PROFILE=1): thread-summed CPU time of
// the tasks and of the tile products, per pass, printed to stderr after each
// call.
struct Profile {
  Profile() {  // AMX packing vs tile cycles of this call (cpu_bf16.h)
    cpu::bf16_count_cycles(true);
    cpu::bf16_take_cycles();
  }
  static constexpr int kSites = 8;
  static bool enabled() {
    static const bool on = [] {
      const char* e = std::getenv("JAX_MFA_PROFILE");
      return e && *e && *e != '0';
    }();
    return on;
  }
  static constexpr int kSlots = 16;
  std::atomic<int64_t> gemm_ns[kSites] = {}, gemm_flops[kSites] = {}, total_ns{0};
  // Tasks run by each participating thread: a helper that XLA's pool starts
  // late shows up as a lopsided split.
  std::atomic<int64_t> tasks_by_slot[kSlots] = {}, busy_ns_by_slot[kSlots] = {};
  void task_done(int64_t slot, int64_t start_ns) {
    const int64_t ns = now_cpu_ns() - start_ns;
    total_ns += ns;
    tasks_by_slot[std::min<int64_t>(slot, kSlots - 1)] += 1;
    busy_ns_by_slot[std::min<int64_t>(slot, kSlots - 1)] += ns;
  }
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  // Wall time of the phases of a call (staging, tasks, reduction), each
  // ending at its mark(): where the time goes outside the tile products.
  static constexpr int kPhases = 6;
  const char* phase_names[kPhases] = {};
  double phase_ms[kPhases] = {};
  int phases = 0;
  std::chrono::steady_clock::time_point last = start;
  void mark(const char* name) {
    const auto now = std::chrono::steady_clock::now();
    if (phases < kPhases) {
      phase_names[phases] = name;
      phase_ms[phases++] = std::chrono::duration<double, std::milli>(now - last).count();
    }
    last = now;
  }
  void report(const char* what, int64_t threads, const char* const* names) {
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    int64_t g = 0;
    for (auto& x : gemm_ns) g += x.load();
    std::fprintf(stderr, "jax_mfa %s: wall %.1f ms, %lld threads, task CPU time %.1f ms, GEMM %.0f%%:",
                 what, wall * 1e3, (long long)threads, total_ns.load() * 1e-6,
                 100.0 * g / std::max<int64_t>(1, total_ns.load()));
    for (int i = 0; i < kSites && names[i]; ++i)
      std::fprintf(stderr, " %s %.0f%% %.1f GF/s;", names[i],
                   100.0 * gemm_ns[i].load() / std::max<int64_t>(1, total_ns.load()),
                   double(gemm_flops[i].load()) / std::max<int64_t>(1, gemm_ns[i].load()));
    std::fprintf(stderr, " tasks per thread:");
    for (auto& n : tasks_by_slot)
      if (n.load()) std::fprintf(stderr, " %lld", (long long)n.load());
    std::fprintf(stderr, "; task CPU ms per thread:");
    for (int i = 0; i < kSlots; ++i)
      if (tasks_by_slot[i].load()) std::fprintf(stderr, " %.1f", busy_ns_by_slot[i].load() * 1e-6);
    std::fprintf(stderr, "; phases (wall ms):");
    for (int i = 0; i < phases; ++i) std::fprintf(stderr, " %s %.2f", phase_names[i], phase_ms[i]);
    if (const cpu::Bf16Cycles cy = cpu::bf16_take_cycles(); cy.pack + cy.tiles > 0)
      std::fprintf(stderr, "; AMX products: operand copies %.0f%%, tile work %.0f%% of their cycles",
                   100.0 * cy.pack / (cy.pack + cy.tiles), 100.0 * cy.tiles / (cy.pack + cy.tiles));
    std::fprintf(stderr, "\n");
  }
};

// A tile product (M x N x K) run by `product`, timed per call site when
// profiling.
template <typename Product>
inline void timed(Profile* prof, int site, int64_t M, int64_t N, int64_t K,
                  const Product& product) {
  if (!prof) return product();
  const int64_t t0 = now_cpu_ns();
  product();
  prof->gemm_ns[site] += now_cpu_ns() - t0;
  prof->gemm_flops[site] += 2 * M * N * K;
}
// A BLAS GEMM call, timed per call site when profiling.
template <typename... Rest>
inline void timed_gemm(Profile* prof, int site, bool ta, bool tb, int64_t M, int64_t N,
                       int64_t K, Rest... rest) {
  timed(prof, site, M, N, K, [&] { gemm(ta, tb, M, N, K, rest...); });
}

// The float path's tile products: on cpu_f32_tiles' register blocks where
// the caller chose them (float only), else BLAS; timed per call site.
// C = alpha * op(A) B (+ C when accumulate), B's rows in place (row stride
// ldb); op(A) = A (row stride lda) or, with ta, A^T of A stored K x M.
template <typename Acc>
void rows_product(Profile* prof, int site, bool own, bool ta, int64_t M, int64_t N, int64_t K,
                  Acc alpha, const Acc* A, int64_t lda, const Acc* B, int64_t ldb,
                  bool accumulate, Acc* C, int64_t ldc) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (own)
      return timed(prof, site, M, N, K, [&] {
        cpu::f32_gemm(M, N, K, alpha, A, ta ? 1 : lda, ta ? lda : 1, B, ldb, 16, accumulate, C,
                      ldc);
      });
  }
  timed_gemm(prof, site, ta, false, M, N, K, alpha, A, lda, B, ldb,
             accumulate ? Acc(1) : Acc(0), C, ldc);
}
// C = alpha * A X^T (X: N rows of K, a key block's K or V): from the
// pack_panels of X^T where given (first column of the product), else BLAS
// on X's rows in place (row stride ldx).
template <typename Acc>
void transposed_product(Profile* prof, int site, const Acc* panels, int64_t M, int64_t N,
                        int64_t K, Acc alpha, const Acc* A, int64_t lda, const Acc* X,
                        int64_t ldx, Acc* C, int64_t ldc) {
  if constexpr (std::is_same_v<Acc, float>) {
    if (panels)
      return timed(prof, site, M, N, K, [&] {
        cpu::f32_gemm(M, N, K, alpha, A, lda, 1, panels, 16, 16 * K, false, C, ldc);
      });
  }
  timed_gemm(prof, site, false, true, M, N, K, alpha, A, lda, X, ldx, Acc(0), C, ldc);
}

// ---------------------------------------------------------------------------
// Threads

// CPUs this process may run on (honours taskset / cgroup cpusets on Linux).
int64_t usable_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Helper threads to use besides the caller for n tasks: never more threads than
// usable CPUs (XLA's pool may be larger, and oversubscription only thrashes
// the caches), optionally capped by JAX_MFA_NUM_THREADS.
int64_t helpers_for(TaskRunner& runner, int64_t n) {
  int64_t threads = usable_cpus();
  if (const char* env = std::getenv("JAX_MFA_NUM_THREADS"); env && std::atoi(env) > 0)
    threads = std::min<int64_t>(threads, std::atoi(env));
  return std::max<int64_t>(0, std::min({runner.num_workers(), threads - 1, n - 1}));
}

// Per-thread tile scratch, reused across tasks and calls (no allocation in
// the hot loops once warm).
template <typename Acc>
Acc* scratch(int id, size_t n) {
  thread_local std::vector<Acc> buffers[16];
  std::vector<Acc>& v = buffers[id];
  if (v.size() < n) v.resize(n);
  return v.data();
}

// The first cache line boundary at or after p (of a buffer allocated with
// 64 bytes to spare): the vector loads of cpu_f32_tiles' panels then never
// straddle two lines.
template <typename W>
W* line_aligned(W* p) {
  return reinterpret_cast<W*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}
// scratch() starting on a cache line.
template <typename Acc>
Acc* scratch_aligned(int id, size_t n) {
  return line_aligned(scratch<Acc>(id, n + 64 / sizeof(Acc)));
}

// ---------------------------------------------------------------------------
// Operand views

// Rows of a (B, L, heads, H) tensor addressed by (batch, kv head, position,
// head-in-group). Either the XLA buffer itself (float32/float64) or a float
// copy of a chunk of (batch, kv head) pairs, laid out [pair][pos][g][h].
template <typename Acc>
struct Rows {
  const Acc* base = nullptr;
  int64_t sb = 0, sk = 0, sp = 0, sg = 0, off0 = 0;
  const Acc* at(int64_t b, int64_t kvh, int64_t pos, int64_t g = 0) const {
    return base + (b * sb + kvh * sk + pos * sp + g * sg - off0);
  }
};

// A buffer left uninitialised, for data written in full before it is read:
// growing a std::vector zeroes it on the calling thread alone while the
// others wait. In the float16/bfloat16 backward's staging (16 threads,
// T=S=2048) that made the step 7-11 ms instead of 2-4 ms.
template <typename V>
struct Uninit {
  std::unique_ptr<V[]> data;
  size_t size = 0;
  V* reserve(size_t n) {
    if (n > size) {
      data.reset(new V[n]);
      size = n;
    }
    return data.get();
  }
};

// View of src (B, L, K*Gs, H) for pairs [p0, p1) (pair = b * K + kvh); Gs is
// the group size for query-side tensors and 1 for key/value.
template <typename T, typename Acc>
Rows<Acc> stage(const T* src, int64_t L, int64_t K, int64_t Gs, int64_t H, int64_t p0,
                int64_t p1, Uninit<Acc>& storage, TaskRunner& runner, const RowOps& ops) {
  if constexpr (std::is_same_v<T, Acc>) {
    return Rows<Acc>{src, L * K * Gs * H, Gs * H, K * Gs * H, H, 0};
  } else {
    const int64_t pairs = p1 - p0, run = Gs * H, block = 256;
    Acc* dst = storage.reserve(size_t(pairs * L * run));
    const int64_t blocks = ceil_div(L, block);
    parallel_for_slots(runner, pairs * blocks, helpers_for(runner, pairs * blocks),
                   [&](int64_t, int64_t task) {
                     const int64_t pl = task / blocks, l0 = (task % blocks) * block;
                     const int64_t p = p0 + pl, b = p / K, kvh = p % K;
                     for (int64_t l = l0; l < std::min(L, l0 + block); ++l)
                       convert(src + ((b * L + l) * K + kvh) * run, dst + (pl * L + l) * run, run,
                               ops);
                   });
    return Rows<Acc>{dst, K * L * run, L * run, run, H, p0 * L * run};
  }
}

// ---------------------------------------------------------------------------
// Masking rules for a stacked tile: rows r = t * G + g are query position
// t0 + t of query head kvh * G + g; columns are keys j0 + c.
template <typename Acc>
struct Rules {
  const AttentionProblem& p;
  const Acc* bias;
  const bool* mask;
  int64_t q_valid, kv_valid, G;
  // Segment ids of this batch row (nullptr without them).
  const int32_t* q_ids = nullptr;
  const int32_t* kv_ids = nullptr;
  // Dropout: this batch row of the seed (metal/dropout_philox.h).
  const uint32_t* seed = nullptr;

  bool transforms() const { return p.softcap > 0 || bias || mask || q_ids; }

  // Keys of [j0, j0 + cols) that queries [t0, t0 + tq) may share a segment
  // with (all of them without segment ids); an empty span skips the tile.
  Span segment_keys(int64_t t0, int64_t tq, int64_t j0, int64_t cols) const {
    if (!q_ids) return {j0, j0 + cols};
    return narrow_to_ids(kv_ids, j0, j0 + cols, id_range(q_ids, t0, t0 + tq));
  }
  // The same from the keys' side: queries of [t0, t0 + tq) that may match
  // a key of [j0, j0 + cols).
  Span segment_queries(int64_t t0, int64_t tq, int64_t j0, int64_t cols) const {
    if (!q_ids) return {t0, t0 + tq};
    return narrow_to_ids(q_ids, t0, t0 + tq, id_range(kv_ids, j0, j0 + cols));
  }

  // Multiplies a stacked tile X (rows t * G + g, keys j0 + c) by the dropout
  // factors: 0 for dropped entries, 1 / (1 - rate) for kept ones. The seed
  // row holds the counter origin (global batch, first head, query and key);
  // one Philox evaluation serves a group of four global keys
  // (metal/dropout_philox.h).
  void dropout(int64_t kvh, int64_t t0, int64_t tq, int64_t j0, int64_t cols, Acc* X,
               int64_t ldx) const {
    if (!seed) return;
    const Acc keep = Acc(p.dropout_keep_scale());
    const uint32_t thr = p.dropout_threshold;
    for (int64_t t = 0; t < tq; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t head =
            p.dropout_broadcast_heads ? 0u : seed[MFA_SEED_HEAD] + uint32_t(kvh * G + g);
        const uint32_t query = seed[MFA_SEED_QUERY] + uint32_t(t0 + t);
        Acc* x = X + (t * G + g) * ldx - j0;
        for (int64_t j = j0; j < j0 + cols;) {
          const uint32_t key = seed[MFA_SEED_KEY] + uint32_t(j);
          const MfaPhilox4 r = mfa_dropout_words(seed[MFA_SEED_KEY0], seed[MFA_SEED_KEY1],
                                                 seed[MFA_SEED_BATCH], head, query, key);
          const uint32_t words[4] = {r.x, r.y, r.z, r.w};
          for (uint32_t e = key & 3u; e < 4 && j < j0 + cols; ++e, ++j)
            x[j] *= words[e] >= thr ? keep : Acc(0);
        }
      }
  }

  // True when every entry of the tile is allowed and the logits need nothing
  // beyond the scale (applied by the GEMM): the common case, skipped cheaply.
  bool plain(int64_t t0, int64_t tq, int64_t j0, int64_t cols) const {
    if (transforms() || t0 + tq > q_valid) return false;
    return p.key_span(t0 + tq - 1, q_valid, kv_valid).begin <= j0 &&
           p.key_span(t0, q_valid, kv_valid).end >= j0 + cols;
  }

  // S holds scale * q.k; turns it into the final logits (-inf where
  // disallowed). th (softcap only) keeps tanh for the backward's chain rule.
  void apply(int64_t b, int64_t kvh, int64_t t0, int64_t tq, int64_t j0, int64_t cols, Acc* S,
             int64_t lds, Acc* th) const {
    const Acc cap = Acc(p.softcap), neg_inf = -std::numeric_limits<Acc>::infinity();
    for (int64_t t = 0; t < tq; ++t) {
      const int64_t i = t0 + t;
      const Span keys = p.key_span(i, q_valid, kv_valid);
      const int64_t lo = std::clamp<int64_t>(keys.begin - j0, 0, cols);
      const int64_t hi = std::clamp<int64_t>(keys.end - j0, lo, cols);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g, n = kvh * G + g;
        Acc* s = S + r * lds;
        if (cap > 0) {
          Acc* tr = th + r * lds;
          for (int64_t c = 0; c < cols; ++c) {
            tr[c] = std::tanh(s[c] / cap);
            s[c] = cap * tr[c];
          }
        }
        if (bias && lo < hi) {
          const Acc* brow = bias + p.bias.offset(b, n, i, 0);
          const int64_t bs = p.bias.strides[3];
          for (int64_t c = lo; c < hi; ++c) s[c] += brow[(j0 + c) * bs];
        }
        std::fill(s, s + lo, neg_inf);
        std::fill(s + hi, s + cols, neg_inf);
        if (mask && lo < hi) {
          const bool* mrow = mask + p.mask.offset(b, n, i, 0);
          const int64_t ms = p.mask.strides[3];
          for (int64_t c = lo; c < hi; ++c)
            if (!mrow[(j0 + c) * ms]) s[c] = neg_inf;
        }
        if (q_ids)
          for (int64_t c = lo; c < hi; ++c)
            if (kv_ids[j0 + c] != q_ids[i]) s[c] = neg_inf;
      }
    }
  }
};

template <typename Acc, typename Buffers>
Rules<Acc> make_rules(const AttentionProblem& p, const Buffers& buf, int64_t b, int64_t G) {
  Rules<Acc> r{p, static_cast<const Acc*>(buf.bias), buf.mask, p.q_valid(buf.q_lengths, b),
               p.kv_valid(buf.kv_lengths, b), G};
  if (p.has_segment_ids) {
    r.q_ids = buf.q_segments + b * p.q_len;
    r.kv_ids = buf.kv_segments + b * p.kv_len;
  }
  if (p.has_dropout()) r.seed = buf.dropout_seed + MFA_DROPOUT_SEED_WORDS * b;
  return r;
}

// Starts the online softmax of a row block: running max -inf and sum 0, or
// with sinks the sink's logit and its exp(sink - sink) = 1.
template <typename Acc>
void init_softmax(const AttentionProblem& p, const Acc* sinks, int64_t b, int64_t kvh,
                  int64_t rows, int64_t G, bool with_sinks, Acc* m, Acc* l) {
  for (int64_t r = 0; r < rows; ++r) {
    const bool sink = with_sinks && sinks;
    m[r] = sink ? p.sink(sinks, b, kvh * G + r % G) : -std::numeric_limits<Acc>::infinity();
    l[r] = sink ? Acc(1) : Acc(0);
  }
}

// Keys any row of positions [t0, t0 + tq) may attend to, within [0, kv_valid).
Span key_span_clamped(const AttentionProblem& p, int64_t t0, int64_t tq, int64_t qv,
                      int64_t kvv) {
  Span s = p.key_span_of_rows(t0, t0 + tq, qv, kvv);
  s.end = std::min(s.end, kvv);  // a trailing empty row can report end > kv_valid
  if (s.end < s.begin) s.end = s.begin;
  return s;
}

// ---------------------------------------------------------------------------
// Forward

// Rows of float16 (row stride src_stride, n values each) as bfloat16 hi and
// lo parts (cpu_bf16.h), rows n apart in the per-thread uint16 scratch
// buffers `id` and id + 1. Returns {hi, lo}.
std::array<const uint16_t*, 2> split_rows(const void* src, int64_t src_stride, int64_t rows,
                                          int64_t n, int id) {
  uint16_t* hi = scratch<uint16_t>(id, rows * n);
  uint16_t* lo = scratch<uint16_t>(id + 1, rows * n);
  for (int64_t r = 0; r < rows; ++r)
    cpu::half_to_bf16_hi_lo(static_cast<const uint16_t*>(src) + r * src_stride, n, hi + r * n,
                            lo + r * n);
  return {hi, lo};
}

// Keys [keys.begin, keys.end) of (batch b, kv head kvh) of a (B, S, K, H)
// key or value tensor, converted into dst (row stride H); the view addresses
// them by key index like the whole tensor's.
template <typename T, typename Acc>
Rows<Acc> convert_keys(const T* src, int64_t S, int64_t K, int64_t H, int64_t b, int64_t kvh,
                       Span keys, Acc* dst, const RowOps& ops) {
  const T* first = src + ((b * S + keys.begin) * K + kvh) * H;
  const int64_t n = keys.end - keys.begin;
  if (K == 1) {
    convert(first, dst, n * H, ops);
  } else {
    for (int64_t j = 0; j < n; ++j) convert(first + j * K * H, dst + j * H, H, ops);
  }
  return Rows<Acc>{dst, 0, 0, H, 0, keys.begin * H};
}

template <typename T, typename Acc>
void forward_typed(const AttentionProblem& p, const ForwardBuffers& buf, TaskRunner& runner) {
  const int64_t B = p.batch, T_ = p.q_len, S_ = p.kv_len, N = p.q_heads, K = p.kv_heads,
                H = p.head_dim, G = p.group_size();
  const RowOps& ops = cpu::row_ops();
  const T* q = static_cast<const T*>(buf.q);
  T* out = static_cast<T*>(buf.out);
  Acc* lse = static_cast<Acc*>(buf.lse);
  const Acc neg_inf = -std::numeric_limits<Acc>::infinity();
  const Acc scale = Acc(p.scale);
  std::unique_ptr<Profile> profile(Profile::enabled() ? new Profile : nullptr);
  Profile* prof = profile.get();

  // Tiles (stacked query rows x keys): chosen by measurement with OpenBLAS on
  // Zen 4 (benchmarks/RESULTS.md). Tiles the causal diagonal or a window
  // edge cuts through are split into row sub-tiles (see `ragged` below).
  const TileShape tile = tile_shape(false, H, {256, H <= 128 ? 256 : 128});
  const int64_t Tq = std::max<int64_t>(1, tile.rows / G), rows_max = Tq * G;
  // bfloat16 dot products (see the top of this file) pair up keys: key
  // blocks then start at even keys. `split`: float16 through hi/lo parts
  // (two of each packed operand; `dot` covers both paths).
  const bool split = use_f16_split<T>(p, T_ * G);
  const bool dot = split || use_bf16_dot<T>(p, T_ * G, ops);
  const int parts = split ? 2 : 1;
  // Products per tile product on the split path. Q K^T takes all four: the
  // logits, hence lse, as accurate as float32's. P V drops P_lo V_lo (at most
  // 2^-18 of |P V|): P itself keeps only 16 significant bits (2^-17) and the
  // output is rounded to float16 (2^-11).
  const int qk_terms = split ? 4 : 1, pv_terms = split ? 3 : 1;
  const int64_t Bk = dot ? (tile.cols + 1) / 2 * 2 : tile.cols;
  const int64_t QB = ceil_div(T_, Tq), pairs = B * K;
  const int64_t hpairs = (H + 1) / 2, kpairs_max = Bk / 2;  // words per row of Q, of P
  const int64_t Sld = (S_ + 15) / 16 * 16, Vpairs = (S_ + 1) / 2;  // packed K^T row, V rows

  // Too few tasks for the cores (decoding): also split the key range.
  const int64_t threads = helpers_for(runner, std::numeric_limits<int64_t>::max()) + 1;
  int64_t SP = 1;
  if (threads > 1 && pairs * QB < 4 * threads)
    SP = std::clamp<int64_t>(ceil_div(4 * threads, pairs * QB), 1,
                             std::max<int64_t>(1, S_ / (2 * Bk)));

  // The float path's tile products on AVX-512 (cpu_f32_tiles.h) instead of
  // BLAS: P V reads V in place; Q K^T reads K^T from 16-column panels, which
  // pays once enough query rows reuse them (not when decoding: there BLAS's
  // small-M path keeps Q K^T). float32 packs the panels once per call
  // (`staged_panels`, for the chunk's pairs, like the dot-product path's
  // repacks): per task and key block they took 5-7% of a forward (Zen 4).
  // The other dtypes pack the key blocks they convert, in the task.
  const bool own = std::is_same_v<Acc, float> && !dot && cpu::f32_tiles_available();
  const bool own_qk = own && std::min(Tq, T_) * G >= 32;
  const bool staged_panels = own_qk && std::is_same_v<T, Acc>;
  const int64_t panel_size = ceil_div(S_, 16) * 16 * H;  // floats per pair

  // float16/bfloat16 on the float path: each task converts the key/value
  // blocks it visits into per-thread scratch (convert_keys). Converting is a
  // few instructions per value against 2 * rows flops of the tile products,
  // and a float copy of the whole K and V staged first cost a write and a
  // re-read of twice the input's bytes: decoding (one query block, memory
  // bound) ran 2.6x slower than float32 with it (RESULTS.md).
  // Chunks of pairs bound the bfloat16 repacks of the dot-product path.
  const bool direct = std::is_same_v<T, Acc>;
  const int64_t per_pair = 2 * S_ * H * int64_t(sizeof(Acc));
  const int64_t chunk =
      dot || staged_panels ? std::clamp<int64_t>((64 << 20) / per_pair, 1, pairs) : pairs;
  // Buffers written in full (or where read) before they are read: left
  // uninitialised, as zeroing them on the calling thread took a large share
  // of short calls (a decode's partial results, a 2048-key bfloat16 repack).
  // Partial results of key slices: per slice, rows of acc, then m, then l,
  // for the stacked rows of one query block (T * G when decoding).
  const int64_t part_rows = std::min(Tq, T_) * G, part_size = part_rows * (H + 2);
  std::unique_ptr<Acc[]> part(SP > 1 ? new Acc[size_t(chunk * QB * SP * part_size)] : nullptr);
  // Pair layouts (cpu_bf16.h) of K^T and V per pair; [1]: lo parts (split).
  // Columns S.. of a K^T row are padding that no product reads.
  std::unique_ptr<uint32_t[]> kpack[2], vpack[2];
  for (int i = 0; dot && i < parts; ++i) {
    kpack[i].reset(new uint32_t[size_t(chunk * hpairs * Sld)]);
    vpack[i].reset(new uint32_t[size_t(chunk * Vpairs * H)]);
  }
  // On AMX (bfloat16): K^T and V also in tile layout (cpu_bf16.h), copied
  // once per call here rather than in every product (once per query block):
  // O(S * H) words per pair of the chunk besides the pair layouts above.
  // Products whose keys do not start on a tile use the pair layouts.
  const bool tiled = dot && !split && cpu::bf16_b_tiles_used();
  const int64_t k_kt = ceil_div(hpairs, 16), v_kt = ceil_div(Vpairs, 16);  // tiles along K
  const int64_t k_tiles_size = k_kt * ceil_div(S_, 16) * 256, v_tiles_size = v_kt * ceil_div(H, 16) * 256;
  struct alignas(64) Tile {  // tile loads and the copies want 64-byte rows
    uint32_t words[256];
  };
  std::unique_ptr<Tile[]> ktile_store(tiled ? new Tile[size_t(chunk * k_tiles_size / 256)] : nullptr);
  std::unique_ptr<Tile[]> vtile_store(tiled ? new Tile[size_t(chunk * v_tiles_size / 256)] : nullptr);
  uint32_t* ktiles = tiled ? ktile_store[0].words : nullptr;
  uint32_t* vtiles = tiled ? vtile_store[0].words : nullptr;
  // On AMX a tile runs in strips of 16 stacked rows (one tile row): the float
  // scores of a strip (16 x Bk) stay in L1 between the Q K^T tile stores, the
  // softmax and the P V product, where a whole tile's (256 KiB) went through
  // L2. Measured on the AMX Xeon: 2-30% faster bfloat16 forwards at 2 and 16
  // threads. Not where B is copied into tiles on every product (the float16
  // split: 2x slower in strips), nor on AVX512-BF16 (Zen 4: slower).
  const int64_t strip_rows = dot_strip_rows(dot, tiled, rows_max);
  // Whole plain tiles on AMX run their strips as a software pipeline (see
  // pipelined_tile below) at H >= 128, where the products take longer than
  // the softmax: measured on 2 cores of the AMX Xeon, T=S=4096, 13-35% faster
  // at H=128 but 5-25% slower at H=64 (not explained; its second strip
  // buffers add 24 KiB to what L1 holds; benchmarks/RESULTS.md).
  // JAX_MFA_AMX_PIPELINE=0 turns it off, =1 on at any H multiple of 32
  // (comparisons, tests).
  const char* pipeline_env = std::getenv("JAX_MFA_AMX_PIPELINE");
  const std::string pipeline_choice = pipeline_env ? pipeline_env : "";
  const bool pipeline = tiled && H % 32 == 0 && scale > Acc(0) && pipeline_choice != "0" &&
                        (H >= 128 || pipeline_choice == "1");
  // K^T panels of the chunk's pairs (staged_panels), from a cache line.
  std::unique_ptr<float[]> panel_store(
      staged_panels ? new float[size_t(chunk * panel_size + 16)] : nullptr);
  float* panels = panel_store ? line_aligned(panel_store.get()) : nullptr;

  for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
    const int64_t p1 = std::min(pairs, p0 + chunk), cp = p1 - p0;
    Rows<Acc> kv, vv;
    if (dot) {
      const int64_t block = 512, blocks = ceil_div(S_, block);
      parallel_for_slots(runner, cp * blocks, helpers_for(runner, cp * blocks),
                         [&](int64_t, int64_t task) {
        const int64_t pl = task / blocks, s0 = (task % blocks) * block;
        const int64_t n = std::min(block, S_ - s0), b = (p0 + pl) / K, kvh = (p0 + pl) % K;
        const int64_t at = ((b * S_ + s0) * K + kvh) * H;
        std::array<const uint16_t*, 2> ks = {reinterpret_cast<const uint16_t*>(buf.k) + at};
        std::array<const uint16_t*, 2> vs = {reinterpret_cast<const uint16_t*>(buf.v) + at};
        int64_t stride = K * H;
        if (split) {
          ks = split_rows(ks[0], stride, n, H, 0);
          vs = split_rows(vs[0], stride, n, H, 2);
          stride = H;
        }
        for (int i = 0; i < parts; ++i) {
          cpu::pack_pairs_in_rows(ks[i], stride, n, H, kpack[i].get() + pl * hpairs * Sld + s0,
                                  Sld, 1);
          cpu::pack_pairs_across_rows(vs[i], stride, n, H,
                                      vpack[i].get() + (pl * Vpairs + s0 / 2) * H, H, 1);
        }
        if (tiled) {  // s0 is a multiple of 32: whole column tiles of K^T, K tiles of V
          cpu::pack_b_tiles(kpack[0].get() + pl * hpairs * Sld + s0, Sld, hpairs, n,
                            ktiles + pl * k_tiles_size + (s0 / 16) * k_kt * 256, k_kt);
          cpu::pack_b_tiles(vpack[0].get() + (pl * Vpairs + s0 / 2) * H, H, (n + 1) / 2, H,
                            vtiles + pl * v_tiles_size + (s0 / 32) * 256, v_kt);
        }
      });
    } else if constexpr (std::is_same_v<T, Acc>) {
      kv = Rows<Acc>{static_cast<const Acc*>(buf.k), S_ * K * H, H, K * H, H, 0};
      vv = Rows<Acc>{static_cast<const Acc*>(buf.v), S_ * K * H, H, K * H, H, 0};
      if constexpr (std::is_same_v<Acc, float>) {
        if (staged_panels) {
          const int64_t block = 512, blocks = ceil_div(S_, block);
          parallel_for_slots(runner, cp * blocks, helpers_for(runner, cp * blocks),
                             [&](int64_t, int64_t task) {
            const int64_t pl = task / blocks, s0 = (task % blocks) * block;
            const int64_t b = (p0 + pl) / K, kvh = (p0 + pl) % K;
            cpu::pack_panels(kv.at(b, kvh, s0), kv.sp, std::min(block, S_ - s0), H,
                             panels + pl * panel_size + s0 * H);
          });
        }
      }
    }
    const int64_t ntasks = cp * QB * SP;
    if (prof) prof->mark("stage");
    parallel_for_slots(runner, ntasks, helpers_for(runner, ntasks), [&](int64_t slot, int64_t task) {
      const int64_t task_start = prof ? now_cpu_ns() : 0;
      // The task's many strip products keep the AMX tiles configured.
      const cpu::AmxTileScope amx_tiles(tiled);
      // Last query blocks first: under a causal mask they are the longest.
      const int64_t sp = task % SP, rest = task / SP;
      const int64_t pl = rest % cp, qb = QB - 1 - rest / cp;
      const int64_t pr = p0 + pl, b = pr / K, kvh = pr % K;
      const int64_t t0 = qb * Tq, tq = std::min(Tq, T_ - t0), rows = tq * G;
      const Rules<Acc> rules = make_rules<Acc>(p, buf, b, G);
      Span span = key_span_clamped(p, t0, tq, rules.q_valid, rules.kv_valid);
      if (dot) span.begin &= ~int64_t(1);  // the extra key is masked by `rules`
      if (staged_panels && !span.empty()) span.begin &= ~int64_t(15);  // tiles start on panels
      if (SP > 1) {
        const int64_t per = ceil_div(ceil_div(span.end - span.begin, Bk), SP) * Bk;
        const int64_t cb = std::min(span.end, span.begin + sp * per);
        span = {cb, std::min(span.end, cb + per)};
      }
      Acc* Qs = scratch<Acc>(0, rows_max * H);
      Acc* Sb = scratch<Acc>(1, rows_max * Bk);
      Acc* acc = scratch<Acc>(2, rows_max * H);
      Acc* m = scratch<Acc>(3, rows_max);
      Acc* l = scratch<Acc>(4, rows_max);
      Acc* th = p.softcap > 0 ? scratch<Acc>(5, rows_max * Bk) : nullptr;
      std::fill(acc, acc + rows * H, Acc(0));
      // The sink term belongs to the first key slice only.
      init_softmax(p, static_cast<const Acc*>(buf.sinks), b, kvh, rows, G, sp == 0, m, l);
      // Packed Q rows and P rows ([1]: lo parts on the split path).
      uint32_t* Qw[2] = {}, *Pw[2] = {};
      for (int i = 0; dot && i < parts; ++i) {
        Qw[i] = scratch<uint32_t>(7 + 2 * i, rows_max * hpairs);
        Pw[i] = scratch<uint32_t>(8 + 2 * i, rows_max * kpairs_max);
      }
      if (span.empty()) {
      } else if (dot) {  // the G heads of a position: G rows H apart
        for (int64_t t = 0; t < tq; ++t) {
          const T* qt = q + ((b * T_ + t0 + t) * N + kvh * G) * H;
          std::array<const uint16_t*, 2> qs = {reinterpret_cast<const uint16_t*>(qt)};
          if (split) qs = split_rows(qs[0], H, G, H, 0);
          for (int i = 0; i < parts; ++i)
            cpu::pack_pairs_in_rows(qs[i], H, G, H, Qw[i] + t * G * hpairs, 1, hpairs);
        }
      } else {  // G heads of a position are contiguous: one run of G*H
        for (int64_t t = 0; t < tq; ++t)
          convert(q + ((b * T_ + t0 + t) * N + kvh * G) * H, Qs + t * G * H, G * H, ops);
      }
      // Keys and values of the current key block on the float path: the
      // inputs in place (float32/float64) or their float copies.
      Rows<Acc> kb = kv, vb = vv;
      // K^T of the current key block in panels (own_qk), from key kpanels_j0.
      const Acc* kpanels = nullptr;
      int64_t kpanels_j0 = 0;
      const uint32_t* Kw[2] = {}, *Vw[2] = {};
      for (int i = 0; dot && i < parts; ++i) {
        Kw[i] = kpack[i].get() + pl * hpairs * Sld;
        Vw[i] = vpack[i].get() + pl * Vpairs * H;
      }

      // Online softmax of stacked row `row` (scores s, `cols` of them; P of
      // the dot-product paths at word offset p_at of Pw): updates m, l and
      // the row of acc, leaves exp(s * mul - m) in s (float path) or P.
      auto softmax_row = [&](int64_t row, Acc* s, int64_t p_at, int64_t cols, Acc mul) {
        Acc& mr = m[row];
        const Acc row_m = std::max(mr, mul * row_max(s, cols, ops));
        if (row_m == neg_inf) {  // nothing allowed yet in this row, or NaN logits only
          // The max may skip NaN; an allowed NaN logit must make the row NaN
          // (out and lse), as in jax.nn. Masked entries are -inf, never NaN.
          if (std::any_of(s, s + cols, [](Acc x) { return std::isnan(x); }))
            mr = l[row] = std::numeric_limits<Acc>::quiet_NaN();
          std::fill(s, s + cols, Acc(0));
          for (int i = 0; dot && i < parts; ++i) std::fill_n(Pw[i] + p_at, (cols + 1) / 2, 0u);
          return;
        }
        const Acc alpha = std::exp(mr - row_m);  // 0 when m was -inf
        Acc sum = 0;
        if constexpr (std::is_same_v<Acc, float>) {
          // P to bfloat16 for P V (an odd count padded with 0): straight
          // from the exponentials, or split into hi and lo parts.
          uint16_t* hi = dot ? reinterpret_cast<uint16_t*>(Pw[0] + p_at) : nullptr;
          uint16_t* lo = split ? reinterpret_cast<uint16_t*>(Pw[1] + p_at) : nullptr;
          if (split) {
            sum = row_exp_sum(s, cols, row_m, ops);
            cpu::float_to_bf16_hi_lo(s, cols, hi, lo);
            if (cols % 2) lo[cols] = 0;
          } else if (dot) {
            sum = ops.exp_sum_to_bfloat(s, hi, cols, mul, row_m);
          }
          if (dot && cols % 2) hi[cols] = 0;
        }
        if (!dot) sum = row_exp_sum(s, cols, row_m, ops);
        l[row] = l[row] * alpha + sum;
        mr = row_m;
        if (alpha != Acc(1)) row_scale(acc + row * H, H, alpha, ops);
      };

      // One tile: query positions [u0, u0 + uq) (stacked rows from
      // (u0 - t0) * G), keys [j0, j0 + cols).
      auto tile = [&](int64_t u0, int64_t uq, int64_t j0, int64_t cols) {
        const int64_t r0 = (u0 - t0) * G, nr = uq * G;
        Acc* a = acc + r0 * H;
        const bool plain = rules.plain(u0, uq, j0, cols);
        // bfloat16: the softmax applies the scale to plain tiles (`mul`), one
        // pass over the scores fewer than scaling them after the product.
        const bool fold = dot && !split && plain && scale > Acc(0);
        const Acc mul = fold ? scale : Acc(1);
        if constexpr (std::is_same_v<Acc, float>) {
          if (dot)
            timed(prof, 0, nr, cols, H, [&] {
              if (tiled && j0 % 16 == 0)
                return cpu::bf16_gemm_b_tiles(
                    nr, cols, hpairs, fold ? 1.0f : scale, Qw[0] + r0 * hpairs, hpairs,
                    ktiles + pl * k_tiles_size + (j0 / 16) * k_kt * 256, k_kt, false, Sb, Bk);
              const uint32_t* A[2] = {Qw[0] + r0 * hpairs, split ? Qw[1] + r0 * hpairs : nullptr};
              const uint32_t* B[2] = {Kw[0] + j0, split ? Kw[1] + j0 : nullptr};
              dot_product(qk_terms, nr, cols, hpairs, fold ? 1.0f : scale, A, hpairs, B, Sld, false,
                          Sb, Bk);
            });
        }
        if (!dot) {  // from the K^T panels where the tile starts on one
          const bool on_panel = kpanels && (j0 - kpanels_j0) % 16 == 0;
          transposed_product(prof, 0, on_panel ? kpanels + (j0 - kpanels_j0) * H : nullptr, nr,
                             cols, H, scale, Qs + r0 * H, H, kb.at(b, kvh, j0), kb.sp, Sb, Bk);
        }
        if (!plain) rules.apply(b, kvh, u0, uq, j0, cols, Sb, Bk, th);
        for (int64_t r = 0; r < nr; ++r)
          softmax_row(r0 + r, Sb + r * Bk, r * kpairs_max, cols, mul);
        // Dropout after the sums: l is not dropped. Never on the dot-product
        // path (use_bf16_dot), whose P is written as bfloat16 by the softmax.
        rules.dropout(kvh, u0, uq, j0, cols, Sb, Bk);
        if constexpr (std::is_same_v<Acc, float>) {
          if (dot) {
            const int64_t kp = (cols + 1) / 2;
            timed(prof, 1, nr, H, cols, [&] {
              // Whole K tiles of V from j0, or its end (zeros past S).
              if (tiled && j0 % 32 == 0 && (cols % 32 == 0 || j0 + cols == S_))
                return cpu::bf16_gemm_b_tiles(nr, H, kp, 1.0f, Pw[0], kpairs_max,
                                              vtiles + pl * v_tiles_size + (j0 / 32) * 256,
                                              v_kt, true, a, H);
              const uint32_t* B[2] = {Vw[0] + (j0 / 2) * H, split ? Vw[1] + (j0 / 2) * H : nullptr};
              dot_product(pv_terms, nr, H, kp, 1.0f, Pw, kpairs_max, B, H, true, a, H);
            });
          }
        }
        if (!dot)
          rows_product(prof, 1, own, false, nr, H, cols, Acc(1), Sb, Bk, vb.at(b, kvh, j0), vb.sp,
                       true, a, H);
      };
      // bfloat16 on AMX, a whole plain tile (no mask inside it, no
      // transforms) with keys [j0, j0 + cols) in whole tiles: its 16-row
      // strips as a software pipeline. While the softmax of strip st runs row
      // by row, the tile unit works on Q K^T of strip st + 1 and on P V of
      // strip st - 1, one block of two C tiles between rows: the products
      // and the softmax overlap instead of taking turns. Scores and P
      // alternate between two strip buffers. False where it does not apply.
      auto pipelined_tile = [&](int64_t j0, int64_t cols) {
        if constexpr (std::is_same_v<Acc, float>) {
          if (!pipeline || rows % 16 != 0 || j0 % 32 != 0 || cols % 32 != 0 ||
              !rules.plain(t0, tq, j0, cols))
            return false;
          const int64_t strips = rows / 16, qk_blocks = cols / 32, pv_blocks = H / 32;
          const uint32_t* k_at = ktiles + pl * k_tiles_size + (j0 / 16) * k_kt * 256;
          const uint32_t* v_at = vtiles + pl * v_tiles_size + (j0 / 32) * 256;
          auto qk = [&](int64_t st, int64_t blk) {  // scores of keys 32 blk.. (unscaled)
            cpu::bf16_strip_block(k_kt, Qw[0] + st * 16 * hpairs, hpairs,
                                  k_at + 2 * blk * k_kt * 256, k_kt, false,
                                  Sb + (st % 2) * 16 * Bk + 32 * blk, Bk);
          };
          auto pv = [&](int64_t st, int64_t blk) {  // output columns 32 blk..
            cpu::bf16_strip_block(cols / 32, Pw[0] + (st % 2) * 16 * kpairs_max, kpairs_max,
                                  v_at + 2 * blk * v_kt * 256, v_kt, true,
                                  acc + st * 16 * H + 32 * blk, H);
          };
          for (int64_t blk = 0; blk < qk_blocks; ++blk) qk(0, blk);
          for (int64_t st = 0; st < strips; ++st) {
            int64_t qk_done = 0, pv_done = 0;
            for (int64_t r = 0; r < 16; ++r) {
              if (st + 1 < strips)
                for (; qk_done < (r + 1) * qk_blocks / 16; ++qk_done) qk(st + 1, qk_done);
              if (st > 0)
                for (; pv_done < (r + 1) * pv_blocks / 16; ++pv_done) pv(st - 1, pv_done);
              softmax_row(st * 16 + r, Sb + ((st % 2) * 16 + r) * Bk,
                          ((st % 2) * 16 + r) * kpairs_max, cols, scale);
            }
            for (; st + 1 < strips && qk_done < qk_blocks; ++qk_done) qk(st + 1, qk_done);
            for (; st > 0 && pv_done < pv_blocks; ++pv_done) pv(st - 1, pv_done);
          }
          for (int64_t blk = 0; blk < pv_blocks; ++blk) pv(strips - 1, blk);
          return true;
        } else {
          (void)j0, (void)cols;
          return false;
        }
      };
      const int64_t sub = std::max<int64_t>(1, 64 / G);  // positions per sub-tile
      const int64_t strip = std::max<int64_t>(1, strip_rows / G);  // positions per strip
      for (int64_t j0 = span.begin; j0 < span.end; j0 += Bk) {
        const int64_t cols = std::min(Bk, span.end - j0);
        const Span seg = rules.segment_keys(t0, tq, j0, cols);
        if (seg.empty()) continue;  // no segment of these queries among these keys
        if (!direct && !dot) {
          const T* k = static_cast<const T*>(buf.k);
          const T* v = static_cast<const T*>(buf.v);
          kb = convert_keys(k, S_, K, H, b, kvh, seg, scratch<Acc>(11, Bk * H), ops);
          vb = convert_keys(v, S_, K, H, b, kvh, seg, scratch<Acc>(12, Bk * H), ops);
        }
        if constexpr (std::is_same_v<Acc, float>) {
          if (staged_panels) {
            kpanels = panels + pl * panel_size;
            kpanels_j0 = 0;
          } else if (own_qk) {  // timed with the Q K^T products it serves
            float* dst = scratch_aligned<float>(13, ceil_div(Bk, 16) * 16 * H);
            timed(prof, 0, 0, 0, 0, [&] {
              cpu::pack_panels(kb.at(b, kvh, seg.begin), kb.sp, seg.end - seg.begin, H, dst);
            });
            kpanels = dst;
            kpanels_j0 = seg.begin;
          }
        }
        const bool ragged =
            t0 + tq > rules.q_valid ||
            p.key_span(t0 + tq - 1, rules.q_valid, rules.kv_valid).begin > j0 ||
            p.key_span(t0, rules.q_valid, rules.kv_valid).end < j0 + cols ||
            (rules.q_ids && rules.q_ids[t0] != rules.q_ids[t0 + tq - 1]);
        if (pipelined_tile(seg.begin, seg.end - seg.begin)) continue;
        if (!ragged || tq <= sub) {
          for (int64_t u0 = t0; u0 < t0 + tq; u0 += strip)
            tile(u0, std::min(strip, t0 + tq - u0), seg.begin, seg.end - seg.begin);
          continue;
        }
        // Rows see different parts of this tile (causal diagonal, window
        // edges, segment boundaries): sub-tiles of rows only compute the
        // columns they may see.
        for (int64_t u0 = t0; u0 < t0 + tq; u0 += sub) {
          const int64_t uq = std::min(sub, t0 + tq - u0);
          const Span us = key_span_clamped(p, u0, uq, rules.q_valid, rules.kv_valid);
          const Span ss = rules.segment_keys(u0, uq, seg.begin, seg.end - seg.begin);
          int64_t lo = std::max({j0, us.begin, ss.begin});
          const int64_t hi = std::min({j0 + cols, us.end, ss.end});
          if (dot) lo &= ~int64_t(1);  // j0 is even: lo stays in the tile
          // Sub-tiles start on a K^T panel where they can; the extra keys are
          // masked by `rules`.
          if (kpanels) lo = std::max(seg.begin, kpanels_j0 + (lo - kpanels_j0) / 16 * 16);
          if (lo < hi) tile(u0, uq, lo, hi - lo);
        }
      }

      if (SP == 1) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t t = r / G, g = r % G;
          const bool empty = l[r] == Acc(0);  // no allowed key: zeros, lse = -inf
          store<T, Acc>(acc + r * H, out + ((b * T_ + t0 + t) * N + kvh * G + g) * H, H,
                        empty ? Acc(0) : Acc(1) / l[r]);
          lse[(b * T_ + t0 + t) * N + kvh * G + g] = empty ? neg_inf : m[r] + std::log(l[r]);
        }
      } else {  // keep the unnormalised partial result for the merge
        Acc* dst = part.get() + ((pl * QB + qb) * SP + sp) * part_size;
        std::copy(acc, acc + rows * H, dst);
        std::copy(m, m + rows, dst + part_rows * H);
        std::copy(l, l + rows, dst + part_rows * (H + 1));
      }
      if (prof) prof->task_done(slot, task_start);
    });

    if (prof) prof->mark("tasks");
    if (SP > 1) {  // merge the key slices of each query block through their lse
      parallel_for_slots(runner, cp * QB, helpers_for(runner, cp * QB), [&](int64_t, int64_t task) {
        const int64_t pl = task / QB, qb = task % QB;
        const int64_t pr = p0 + pl, b = pr / K, kvh = pr % K;
        const int64_t t0 = qb * Tq, tq = std::min(Tq, T_ - t0), rows = tq * G;
        const Acc* base = part.get() + (pl * QB + qb) * SP * part_size;
        Acc* o = scratch<Acc>(6, H);
        for (int64_t r = 0; r < rows; ++r) {
          Acc mx = neg_inf;  // a NaN slice maximum (NaN logit) wins: the row is NaN
          for (int64_t s = 0; s < SP; ++s) {
            const Acc ms = base[s * part_size + part_rows * H + r];
            if (std::isnan(ms) || ms > mx) mx = ms;
          }
          Acc sum = 0;
          std::fill(o, o + H, Acc(0));
          if (mx != neg_inf)
            for (int64_t s = 0; s < SP; ++s) {
              const Acc* ps = base + s * part_size;
              const Acc w = std::exp(ps[part_rows * H + r] - mx);
              if (w == Acc(0)) continue;
              sum += w * ps[part_rows * (H + 1) + r];
              for (int64_t h = 0; h < H; ++h) o[h] += w * ps[r * H + h];
            }
          const int64_t t = r / G, g = r % G;
          const bool empty = sum == Acc(0);  // NaN (a NaN logit) is not empty
          store<T, Acc>(o, out + ((b * T_ + t0 + t) * N + kvh * G + g) * H, H,
                        empty ? Acc(0) : Acc(1) / sum);
          lse[(b * T_ + t0 + t) * N + kvh * G + g] = empty ? neg_inf : mx + std::log(sum);
        }
      });
    }
  }
  if (prof) {
    static const char* const names[] = {"QK^T", "PV", nullptr};
    prof->report("forward", threads, names);
  }
}

// ---------------------------------------------------------------------------
// Backward

template <typename T, typename Acc>
void backward_typed(const AttentionProblem& p, const BackwardBuffers& buf, TaskRunner& runner) {
  const int64_t B = p.batch, T_ = p.q_len, S_ = p.kv_len, N = p.q_heads, K = p.kv_heads,
                H = p.head_dim, G = p.group_size();
  const RowOps& ops = cpu::row_ops();
  T* dq = static_cast<T*>(buf.dq);
  T* dk = static_cast<T*>(buf.dk);
  T* dv = static_cast<T*>(buf.dv);
  const Acc* lse_all = static_cast<const Acc*>(buf.lse);
  const Acc* delta_all = static_cast<const Acc*>(buf.delta);
  const Acc* bias = static_cast<const Acc*>(buf.bias);
  Acc* dbias = static_cast<Acc*>(buf.dbias);
  const Acc scale = Acc(p.scale);
  const Acc inf = std::numeric_limits<Acc>::infinity();
  std::unique_ptr<Profile> profile(Profile::enabled() ? new Profile : nullptr);
  Profile* prof = profile.get();

  const TileShape tile = tile_shape(true, H, {256, 256});
  // bfloat16 dot products (see the top of this file) pair up keys, and for
  // dK and dV query rows: blocks of both then start at even indices.
  const bool dot = use_bf16_dot<T>(p, T_ * G, ops);
  const int64_t even = dot ? 2 : 1;
  const int64_t Tq = ceil_div(std::max<int64_t>(1, tile.rows / G), even) * even;
  const int64_t rows_max = Tq * G;
  const int64_t Bk = ceil_div(tile.cols, even) * even;
  const int64_t KB = ceil_div(S_, Bk), pairs = B * K;
  // Pair layouts per (batch, kv head) on the dot-product path: Q and dO rows
  // (A of Q K^T, dO V^T), Q^T and dO^T pairs across rows (A of dK^T, dV^T),
  // K^T and V^T (B of Q K^T, dO V^T), K pairs across keys (B of dS K).
  const int64_t TG = T_ * G, hpairs = (H + 1) / 2, rpairs = (TG + 1) / 2;
  const int64_t Sld = ceil_div(S_, 16) * 16, Spairs = (S_ + 1) / 2;

  // The bias gradient sums dS over the dims the bias is broadcast along. When
  // the bias varies along keys, the key-block tasks own its columns (tasks
  // cover every batch / head the bias is broadcast over, so each element has
  // one writer); when it is constant along keys, per-thread row sums of dS
  // are reduced at the end.
  const bool dbias_cols = bias && p.bias.dims[3] == p.kv_len;
  const bool dbias_rows = bias && !dbias_cols;
  const bool merge_batches = dbias_cols && p.bias.dims[0] == 1;
  const bool merge_heads = dbias_cols && p.bias.dims[1] == 1;
  if (dbias_cols) std::fill(dbias, dbias + p.bias.size(), Acc(0));
  std::vector<Acc> row_sums(dbias_rows ? B * N * T_ : 0, Acc(0));

  // dQ (and the dbias row sums): every key-block task adds to the rows of
  // its pair. Each product lands in a per-thread tile that is added to one
  // float sum per pair under a lock per block of kLockRows query positions,
  // held for the addition only; tasks of a pair start at different row
  // blocks, so they seldom meet. No per-thread copies of dQ to zero and sum
  // (on 16 threads those were 16x dQ of memory traffic per call).
  constexpr int64_t kLockRows = 64;
  const int64_t threads = helpers_for(runner, std::numeric_limits<int64_t>::max()) + 1;
  const int64_t LB = ceil_div(T_, kLockRows);
  const int64_t sum_pair = T_ * G * H + (dbias_rows ? T_ * G : 0);  // dQ, then row sums
  const bool direct = std::is_same_v<T, Acc>;
  // Chunks of (batch, kv head) pairs bound the dQ sums (and the float copies
  // of float16/bfloat16 inputs).
  const int64_t per_pair =
      int64_t(sizeof(Acc)) * (sum_pair + (direct ? 0 : 2 * (T_ * G * H + S_ * H)));
  int64_t chunk = std::clamp<int64_t>((128 << 20) / std::max<int64_t>(per_pair, 1), 1, pairs);
  if (merge_batches || merge_heads) chunk = pairs;
  // Uninitialised: a lock block is zeroed by its first writer.
  std::unique_ptr<Acc[]> dq_sums(new Acc[size_t(chunk * sum_pair)]);
  std::unique_ptr<std::mutex[]> dq_locks(new std::mutex[size_t(chunk * LB)]);
  std::vector<char> dq_written;
  Uninit<Acc> qbuf, dobuf, kbuf, vbuf;
  Uninit<uint32_t> qw_buf, dow_buf, qt_buf, dot_buf, kt_buf, vt_buf, kw_buf;
  uint32_t *qw = nullptr, *dow = nullptr, *qt = nullptr, *dot_ = nullptr, *kt = nullptr,
           *vt = nullptr, *kw = nullptr;
  // The float path's products on AVX-512 (cpu_f32_tiles.h), as in the
  // forward: Q K^T and dO V^T from K^T and V^T panels packed once per key
  // block of a task (and only with enough query rows to reuse them), the
  // other three with their operands in place.
  const bool own = std::is_same_v<Acc, float> && !dot && cpu::f32_tiles_available();
  const bool own_panels = own && TG >= 32;
  // On AMX, as in the forward: the tiles configured once per task; the key
  // block's B operands (K^T, V^T, K) copied into tile layout once per task
  // instead of in every product, P and dS converted straight into it, and
  // A operands (Q, dO and their transposes, dS) read in place where their
  // rows are whole tiles.
  const bool tiled = dot && cpu::bf16_b_tiles_used();
  const int64_t h_kt = ceil_div(hpairs, 16), col_tiles = ceil_div(Bk, 16);

  for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
    const int64_t p1 = std::min(pairs, p0 + chunk), cp = p1 - p0;
    Rows<Acc> qv, dov, kv, vv;
    if (dot) {
      // Every word is written below (K^T's padding columns S.. excepted,
      // which no product reads). Tasks: blocks of query positions (Q and dO
      // rows, then their pairs across rows) and blocks of keys (K^T, V^T and
      // K's pairs across keys) of every pair, so that all threads share the
      // packing (one task per pair left most of them idle).
      qw = qw_buf.reserve(size_t(cp * TG * hpairs));
      dow = dow_buf.reserve(size_t(cp * TG * hpairs));
      qt = qt_buf.reserve(size_t(cp * H * rpairs));
      dot_ = dot_buf.reserve(size_t(cp * H * rpairs));
      kt = kt_buf.reserve(size_t(cp * hpairs * Sld));
      vt = vt_buf.reserve(size_t(cp * hpairs * Sld));
      kw = kw_buf.reserve(size_t(cp * Spairs * H));
      const int64_t tblock = 256, sblock = 512;  // even: pairs across rows start in the block
      const int64_t tblocks = ceil_div(T_, tblock), sblocks = ceil_div(S_, sblock);
      const int64_t per_pair = tblocks + sblocks;
      parallel_for_slots(runner, cp * per_pair, helpers_for(runner, cp * per_pair),
                         [&](int64_t, int64_t task) {
        const int64_t pl = task / per_pair, part = task % per_pair;
        const int64_t b = (p0 + pl) / K, kvh = (p0 + pl) % K;
        if (part < tblocks) {
          const auto* q16 = reinterpret_cast<const uint16_t*>(buf.q);
          const auto* do16 = reinterpret_cast<const uint16_t*>(buf.dout);
          uint32_t* qr = qw + pl * TG * hpairs;
          uint32_t* dor = dow + pl * TG * hpairs;
          const int64_t t0 = part * tblock, t1 = std::min(T_, t0 + tblock);
          for (int64_t t = t0; t < t1; ++t) {  // the G heads of a position: G rows H apart
            const int64_t at = ((b * T_ + t) * N + kvh * G) * H;
            cpu::pack_pairs_in_rows(q16 + at, H, G, H, qr + t * G * hpairs, 1, hpairs);
            cpu::pack_pairs_in_rows(do16 + at, H, G, H, dor + t * G * hpairs, 1, hpairs);
          }
          const int64_t r0 = t0 * G, rows = (t1 - t0) * G;  // r0 even (t0 is)
          cpu::pack_pairs_across_rows(reinterpret_cast<const uint16_t*>(qr + r0 * hpairs),
                                      2 * hpairs, rows, H, qt + pl * H * rpairs + r0 / 2, 1,
                                      rpairs);
          cpu::pack_pairs_across_rows(reinterpret_cast<const uint16_t*>(dor + r0 * hpairs),
                                      2 * hpairs, rows, H, dot_ + pl * H * rpairs + r0 / 2, 1,
                                      rpairs);
          return;
        }
        const int64_t s0 = (part - tblocks) * sblock, n = std::min(sblock, S_ - s0);
        const int64_t at = ((b * S_ + s0) * K + kvh) * H;
        const auto* k16 = reinterpret_cast<const uint16_t*>(buf.k) + at;
        const auto* v16 = reinterpret_cast<const uint16_t*>(buf.v) + at;
        cpu::pack_pairs_in_rows(k16, K * H, n, H, kt + pl * hpairs * Sld + s0, Sld, 1);
        cpu::pack_pairs_in_rows(v16, K * H, n, H, vt + pl * hpairs * Sld + s0, Sld, 1);
        cpu::pack_pairs_across_rows(k16, K * H, n, H, kw + (pl * Spairs + s0 / 2) * H, H, 1);
      });
    } else {
      qv = stage<T, Acc>(static_cast<const T*>(buf.q), T_, K, G, H, p0, p1, qbuf, runner, ops);
      dov = stage<T, Acc>(static_cast<const T*>(buf.dout), T_, K, G, H, p0, p1, dobuf, runner,
                          ops);
      kv = stage<T, Acc>(static_cast<const T*>(buf.k), S_, K, 1, H, p0, p1, kbuf, runner, ops);
      vv = stage<T, Acc>(static_cast<const T*>(buf.v), S_, K, 1, H, p0, p1, vbuf, runner, ops);
    }
    // Groups of pairs one task covers: single pairs, or the pairs sharing a
    // broadcast dbias slice.
    std::vector<std::vector<int64_t>> groups;
    if (merge_batches && merge_heads) {
      groups.emplace_back();
      for (int64_t pr = p0; pr < p1; ++pr) groups.back().push_back(pr);
    } else if (merge_batches) {
      for (int64_t kvh = 0; kvh < K; ++kvh) {
        groups.emplace_back();
        for (int64_t b = 0; b < B; ++b) groups.back().push_back(b * K + kvh);
      }
    } else if (merge_heads) {
      for (int64_t b = 0; b < B; ++b) {
        groups.emplace_back();
        for (int64_t kvh = 0; kvh < K; ++kvh) groups.back().push_back(b * K + kvh);
      }
    } else {
      for (int64_t pr = p0; pr < p1; ++pr) groups.push_back({pr});
    }
    const int64_t ngroups = int64_t(groups.size()), ntasks = ngroups * KB;
    const int64_t helpers = helpers_for(runner, ntasks);
    dq_written.assign(size_t(cp * LB), 0);
    if (prof) prof->mark("stage");

    parallel_for_slots(runner, ntasks, helpers, [&](int64_t slot, int64_t task) {
      const int64_t task_start = prof ? now_cpu_ns() : 0;
      const cpu::AmxTileScope amx_tiles(tiled);
      // First key blocks first: under a causal mask they are the longest.
      const int64_t kb = task / ngroups;
      const std::vector<int64_t>& group = groups[task % ngroups];
      const int64_t j0 = kb * Bk, cols = std::min(Bk, S_ - j0);
      Acc* Qs = scratch<Acc>(0, rows_max * H);
      Acc* dOs = scratch<Acc>(1, rows_max * H);
      Acc* Pb = scratch<Acc>(2, rows_max * Bk);
      Acc* dPb = scratch<Acc>(3, rows_max * Bk);
      Acc* th = p.softcap > 0 ? scratch<Acc>(4, rows_max * Bk) : nullptr;
      Acc* dK = scratch<Acc>(5, Bk * H);
      Acc* dV = scratch<Acc>(6, Bk * H);
      Acc* lse = scratch<Acc>(7, rows_max);
      Acc* delta = scratch<Acc>(8, rows_max);
      Acc* Zb = p.has_dropout() ? scratch<Acc>(10, rows_max * Bk) : nullptr;  // dropout factors
      Acc* dQt = scratch<Acc>(13, rows_max * H);  // this tile's dQ rows
      Acc* rst = scratch<Acc>(14, rows_max);      // and dbias row sums
      for (const int64_t pr : group) {
        const int64_t b = pr / K, kvh = pr % K, pl = pr - p0;
        const Rules<Acc> rules = make_rules<Acc>(p, buf, b, G);
        Span rspan = p.query_span_of_keys(j0, j0 + cols, rules.q_valid, rules.kv_valid);
        if (dot && !rspan.empty()) {  // even row blocks; the extra rows are masked by `rules`
          rspan.begin &= ~int64_t(1);
          rspan.end = std::min(T_, ceil_div(rspan.end, 2) * 2);
        }
        // dK, dV: cols x H, or transposed (H x Bk) on the dot-product path.
        std::fill(dK, dK + Bk * H, Acc(0));
        std::fill(dV, dV + Bk * H, Acc(0));
        const Acc* Kp = dot ? nullptr : kv.at(b, kvh, j0);
        const Acc* Vp = dot ? nullptr : vv.at(b, kvh, j0);
        Acc* kpanels = own_panels ? scratch_aligned<Acc>(9, ceil_div(Bk, 16) * 16 * H) : nullptr;
        Acc* vpanels = own_panels ? scratch_aligned<Acc>(11, ceil_div(Bk, 16) * 16 * H) : nullptr;
        if constexpr (std::is_same_v<Acc, float>) {
          if (own_panels && !rspan.empty())  // timed with the products they serve
            timed(prof, 0, 0, 0, 0, [&] {
              cpu::pack_panels(Kp, kv.sp, cols, H, kpanels);
              cpu::pack_panels(Vp, vv.sp, cols, H, vpanels);
            });
        }
        // This key block's operands on the dot-product path: K^T and V^T
        // (pair layout from kto, row stride Sld), K's pairs across keys (kwo);
        // on AMX also in tile layout (Kt, Vt, Kw).
        const int64_t kto = pl * hpairs * Sld + j0, kwo = (pl * Spairs + j0 / 2) * H;
        const int64_t cpairs = (cols + 1) / 2, c_kt = ceil_div(cpairs, 16);
        uint32_t* Kt = tiled ? scratch_aligned<uint32_t>(12, h_kt * col_tiles * 256) : nullptr;
        uint32_t* Vt = tiled ? scratch_aligned<uint32_t>(13, h_kt * col_tiles * 256) : nullptr;
        uint32_t* Kw = tiled ? scratch_aligned<uint32_t>(14, c_kt * ceil_div(H, 16) * 256) : nullptr;
        if (tiled && !rspan.empty())  // timed with the products they serve
          timed(prof, 0, 0, 0, 0, [&] {
            cpu::pack_b_tiles(kt + kto, Sld, hpairs, cols, Kt, h_kt);
            cpu::pack_b_tiles(vt + kto, Sld, hpairs, cols, Vt, h_kt);
            cpu::pack_b_tiles(kw + kwo, H, cpairs, H, Kw, c_kt);
          });
        // The dot-product path's B operands: tile layout on AMX, else pair layout.
        const BWords kT = tiled ? BWords{Kt, h_kt} : BWords{kt + kto, Sld};
        const BWords vT = tiled ? BWords{Vt, h_kt} : BWords{vt + kto, Sld};
        const BWords kP = tiled ? BWords{Kw, c_kt} : BWords{kw + kwo, H};
        // C (M x N) = alpha A B (+ C), profiled at `site` as M x N x k.
        auto product = [&](int site, int64_t M, int64_t N, int64_t k, int64_t pairs, float alpha,
                           const uint32_t* A, int64_t lda, BWords B, bool accumulate, float* C,
                           int64_t ldc) {
          timed(prof, site, M, N, k, [&] {
            if (tiled)
              return cpu::bf16_gemm_b_tiles(M, N, pairs, alpha, A, lda, B.words, B.stride,
                                            accumulate, C, ldc);
            cpu::bf16_gemm(M, N, pairs, alpha, A, lda, B.words, B.stride, accumulate, C, ldc);
          });
        };
        Acc* dq_acc = dq_sums.get() + pl * sum_pair;
        Acc* rs_acc = dq_acc + T_ * G * H;
        // Adds this tile's dQ rows (and row sums) of positions [t0, t0 + tq)
        // to the pair's sums, one lock block at a time.
        auto add_dq = [&](int64_t t0, int64_t tq) {
          for (int64_t u = t0; u < t0 + tq;) {
            const int64_t lb = u / kLockRows, u1 = std::min(t0 + tq, (lb + 1) * kLockRows);
            std::lock_guard<std::mutex> guard(dq_locks[size_t(pl * LB + lb)]);
            if (!dq_written[size_t(pl * LB + lb)]) {
              const int64_t b0 = lb * kLockRows, b1 = std::min(T_, b0 + kLockRows);
              std::fill(dq_acc + b0 * G * H, dq_acc + b1 * G * H, Acc(0));
              if (dbias_rows) std::fill(rs_acc + b0 * G, rs_acc + b1 * G, Acc(0));
              dq_written[size_t(pl * LB + lb)] = 1;
            }
            Acc* d = dq_acc + u * G * H;
            const Acc* s = dQt + (u - t0) * G * H;
            for (int64_t e = 0; e < (u1 - u) * G * H; ++e) d[e] += s[e];
            if (dbias_rows)
              for (int64_t r = (u - t0) * G; r < (u1 - t0) * G; ++r) rs_acc[t0 * G + r] += rst[r];
            u = u1;
          }
        };
        // Row blocks in rotated order, from a different one in each key
        // block's task: tasks of a pair then add to different lock blocks.
        const int64_t nrb = ceil_div(rspan.end - rspan.begin, Tq);
        for (int64_t ib = 0; ib < nrb; ++ib) {
          const int64_t tb = rspan.begin + ((ib + kb) % nrb) * Tq;
          // Only the queries that may share a segment with these keys.
          const Span seg = rules.segment_queries(tb, std::min(Tq, rspan.end - tb), j0, cols);
          if (seg.empty()) continue;
          const int64_t t0 = seg.begin, tq = seg.end - seg.begin, rows = tq * G;
          // Used in place when the stacked rows are evenly spaced in memory
          // (one head per group: stride sp; or G heads whose positions are
          // G*H apart: stride H); packed otherwise.
          const Acc* Qp = dot ? nullptr : qv.at(b, kvh, t0);
          const Acc* dOp = dot ? nullptr : dov.at(b, kvh, t0);
          int64_t ldq = G == 1 ? qv.sp : H, lddo = G == 1 ? dov.sp : H;
          if (!dot && G > 1 && qv.sp != G * H) {
            for (int64_t t = 0; t < tq; ++t) {
              std::copy(qv.at(b, kvh, t0 + t), qv.at(b, kvh, t0 + t) + G * H, Qs + t * G * H);
              std::copy(dov.at(b, kvh, t0 + t), dov.at(b, kvh, t0 + t) + G * H, dOs + t * G * H);
            }
            Qp = Qs;
            dOp = dOs;
            ldq = lddo = H;
          }
          for (int64_t t = 0; t < tq; ++t)
            for (int64_t g = 0; g < G; ++g) {
              const int64_t idx = (b * T_ + t0 + t) * N + kvh * G + g;
              // Rows without any key (lse = -inf) get P = 0 everywhere.
              lse[t * G + g] = lse_all[idx] == -inf ? inf : lse_all[idx];
              delta[t * G + g] = delta_all[idx];
            }
          // Operands of this tile on the dot-product path.
          const int64_t r0 = t0 * G, ro = (pl * TG + r0) * hpairs, rt = pl * H * rpairs + r0 / 2;
          // The dot-product path applies the scale in the exponential of
          // plain tiles, as the forward does: on AMX a scaled product takes
          // an extra pass over its output.
          const bool plain = rules.plain(t0, tq, j0, cols);
          const bool fold = dot && plain && scale > Acc(0);
          const Acc mul = fold ? scale : Acc(1), qk_alpha = fold ? Acc(1) : scale;
          if constexpr (std::is_same_v<Acc, float>) {
            if (dot) product(0, rows, cols, H, hpairs, qk_alpha, qw + ro, hpairs, kT, false, Pb, Bk);
          }
          if (!dot)
            transposed_product(prof, 0, kpanels, rows, cols, H, scale, Qp, ldq, Kp, kv.sp, Pb, Bk);
          if (!plain) rules.apply(b, kvh, t0, tq, j0, cols, Pb, Bk, th);
          for (int64_t r = 0; r < rows; ++r) row_exp(Pb + r * Bk, cols, mul, lse[r], ops);
          if constexpr (std::is_same_v<Acc, float>) {
            if (dot) product(1, rows, cols, H, hpairs, 1.0f, dow + ro, hpairs, vT, false, dPb, Bk);
          }
          if (!dot)
            transposed_product(prof, 1, vpanels, rows, cols, H, Acc(1), dOp, lddo, Vp, vv.sp, dPb,
                               Bk);
          // Dropout: dS = P (dP Z - delta), and dV takes (P Z)^T dO. The
          // factors Z are drawn once into a tile and used twice (never on
          // the dot-product path, see use_bf16_dot).
          if (rules.seed) {
            for (int64_t r = 0; r < rows; ++r) std::fill(Zb + r * Bk, Zb + r * Bk + cols, Acc(1));
            rules.dropout(kvh, t0, tq, j0, cols, Zb, Bk);
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) dPb[r * Bk + c] *= Zb[r * Bk + c];
          }
          for (int64_t r = 0; r < rows; ++r) row_ds(Pb + r * Bk, dPb + r * Bk, cols, delta[r], ops);
          if (rules.seed)
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) Pb[r * Bk + c] *= Zb[r * Bk + c];
          // dPb now holds dS, the gradient of the post-bias logits.
          if (dbias_cols)
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = t0 + r / G, n = kvh * G + r % G;
              Acc* d = dbias + p.bias.offset(merge_batches ? 0 : b, merge_heads ? 0 : n, i, j0);
              const Acc* ds = dPb + r * Bk;
              for (int64_t c = 0; c < cols; ++c) d[c] += ds[c];
            }
          if (dbias_rows)
            for (int64_t r = 0; r < rows; ++r) {
              Acc sum = 0;
              for (int64_t c = 0; c < cols; ++c) sum += dPb[r * Bk + c];
              rst[r] = sum;
            }
          if (th)  // through the softcap: d tanh = 1 - tanh^2
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t c = 0; c < cols; ++c) {
                const Acc tt = th[r * Bk + c];
                dPb[r * Bk + c] *= Acc(1) - tt * tt;
              }
          if constexpr (std::is_same_v<Acc, float>) {
            if (dot) {  // dV^T += dO^T P, dK^T += Q^T dS (scaled at the store), dQ += scale dS K
              const int64_t rp = (rows + 1) / 2, r_kt = ceil_div(rp, 16);
              uint32_t* dSw = scratch<uint32_t>(9, rows_max * (Bk / 2));
              cpu::float_to_pairs_in_rows(dPb, Bk, rows, cols, dSw, Bk / 2);
              // P and dS pairs across rows (B operands of dV^T and dK^T) in
              // scratch `id`: tile layout on AMX, else pair layout.
              auto across_rows = [&](const float* src, int id) {
                if (!tiled) {
                  uint32_t* dst = scratch<uint32_t>(id, (rows_max / 2 + 1) * Bk);
                  cpu::float_to_pairs_across_rows(src, Bk, rows, cols, dst, Bk);
                  return BWords{dst, Bk};
                }
                uint32_t* dst = scratch_aligned<uint32_t>(id, r_kt * col_tiles * 256);
                cpu::float_to_b_tiles(src, Bk, rows, cols, dst, r_kt);
                return BWords{dst, r_kt};
              };
              const BWords pB = across_rows(Pb, 10), dsB = across_rows(dPb, 11);
              product(2, H, cols, rows, rp, 1.0f, dot_ + rt, rpairs, pB, true, dV, Bk);
              product(3, H, cols, rows, rp, 1.0f, qt + rt, rpairs, dsB, true, dK, Bk);
              product(4, rows, H, cols, cpairs, scale, dSw, Bk / 2, kP, false, dQt, H);
            }
          }
          if (!dot) {  // P^T and dS^T read in place
            rows_product(prof, 2, own, true, cols, H, rows, Acc(1), Pb, Bk, dOp, lddo, true, dV, H);
            rows_product(prof, 3, own, true, cols, H, rows, scale, dPb, Bk, Qp, ldq, true, dK, H);
            rows_product(prof, 4, own, false, rows, H, cols, scale, dPb, Bk, Kp, kv.sp, false, dQt,
                         H);
          }
          add_dq(t0, tq);
        }
        Acc* column = scratch<Acc>(12, H);
        for (int64_t c = 0; c < cols; ++c) {
          const Acc* dk_row = dK + c * H;
          const Acc* dv_row = dV + c * H;
          if (dot) {  // transposed accumulators: gather column c
            for (int64_t h = 0; h < H; ++h) column[h] = dK[h * Bk + c];
            dk_row = column;
          }
          // The dot-product path accumulates dK unscaled (AMX accumulates in
          // place only with alpha = 1).
          store<T, Acc>(dk_row, dk + ((b * S_ + j0 + c) * K + kvh) * H, H, dot ? scale : Acc(1));
          if (dot) {
            for (int64_t h = 0; h < H; ++h) column[h] = dV[h * Bk + c];
            dv_row = column;
          }
          store<T, Acc>(dv_row, dv + ((b * S_ + j0 + c) * K + kvh) * H, H, Acc(1));
        }
      }
      if (prof) prof->task_done(slot, task_start);
    });

    if (prof) prof->mark("tasks");
    // The dQ (and dbias row) sums into the outputs, one lock block per task;
    // zeros where no task wrote.
    parallel_for_slots(runner, cp * LB, helpers_for(runner, cp * LB), [&](int64_t, int64_t i) {
      const int64_t pl = i / LB, pr = p0 + pl, b = pr / K, kvh = pr % K;
      const int64_t b0 = (i % LB) * kLockRows, b1 = std::min(T_, b0 + kLockRows);
      Acc* sums = dq_sums.get() + pl * sum_pair;
      if (!dq_written[size_t(i)]) {
        std::fill(sums + b0 * G * H, sums + b1 * G * H, Acc(0));
        if (dbias_rows) std::fill(sums + T_ * G * H + b0 * G, sums + T_ * G * H + b1 * G, Acc(0));
      }
      for (int64_t t = b0; t < b1; ++t) {
        store<T, Acc>(sums + t * G * H, dq + ((b * T_ + t) * N + kvh * G) * H, G * H, Acc(1));
        if (dbias_rows)
          for (int64_t g = 0; g < G; ++g)
            row_sums[(b * N + kvh * G + g) * T_ + t] = sums[T_ * G * H + t * G + g];
      }
    });
    if (prof) prof->mark("reduce");
  }

  if (dbias_rows) {
    // Bias constant along keys: reduce the per-row sums over broadcast dims.
    std::fill(dbias, dbias + p.bias.size(), Acc(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t i = 0; i < T_; ++i)
          dbias[p.bias.offset(b, n, i, 0)] += row_sums[(b * N + n) * T_ + i];
  }
  if (prof) {
    static const char* const names[] = {"QK^T", "dO V^T", "P^T dO", "dS^T Q", "dS K", nullptr};
    prof->report("backward", threads, names);
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

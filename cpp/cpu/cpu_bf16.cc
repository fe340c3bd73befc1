#include "cpu/cpu_bf16.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/cpu_x86.h"

#ifdef JAX_MFA_X86
// AMX needs the Linux permission request below and AMX intrinsics (GCC 11,
// clang 12).
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && __GNUC__ >= 11))
#define JAX_MFA_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace jax_mfa {
namespace cpu {

bool cpu_has_avx512_bf16() {
#ifdef JAX_MFA_X86
  static const bool has = [] {
    // AVX-512 usable (CPU and OS state) from the compiler's check; BF16 from
    // cpuid leaf 7 subleaf 1, EAX bit 5 (not every compiler names it).
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#ifdef JAX_MFA_AMX
  static const bool has = [] {
    // cpuid leaf 7 subleaf 0, EDX: bit 22 AMX-BF16, bit 24 AMX-TILE.
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
      return false;
    // Linux hands out the 8 KiB tile state only on request (since 5.16);
    // without it the first tile instruction faults. Refused on older kernels.
    constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
    if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
    unsigned long granted = 0;
    return syscall(SYS_arch_prctl, kGetXcompPerm, &granted) == 0 &&
           (granted & (1ul << kXtileData));
  }();
  return has;
#else
  return false;
#endif
}

Bf16Dot bf16_dot_kind() {
  // The packing and conversions use AVX512-BF16; every AMX CPU has it.
  if (!cpu_has_avx512_bf16()) return Bf16Dot::None;
  const char* choice = std::getenv("JAX_MFA_BF16_DOT");
  if (choice && std::strcmp(choice, "0") == 0) return Bf16Dot::None;
  if (choice && std::strcmp(choice, "avx512") == 0) return Bf16Dot::Avx512;
  return cpu_has_amx_bf16() ? Bf16Dot::Amx : Bf16Dot::Avx512;
}

bool f16_split_available() {
  const Bf16Dot kind = bf16_dot_kind();
  if (kind == Bf16Dot::None) return false;
  const char* choice = std::getenv("JAX_MFA_F16_SPLIT");
  return choice && std::strcmp(choice, "1") == 0;
}

void pack_pairs_in_rows(const uint16_t* src, int64_t src_stride, int64_t rows, int64_t K,
                        uint32_t* dst, int64_t pair_stride, int64_t row_stride) {
  const int64_t pairs = (K + 1) / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = src + r * src_stride;
    uint32_t* d = dst + r * row_stride;
    for (int64_t kp = 0; kp < K / 2; ++kp)
      d[kp * pair_stride] = uint32_t(row[2 * kp]) | (uint32_t(row[2 * kp + 1]) << 16);
    if (K % 2) d[(pairs - 1) * pair_stride] = row[K - 1];
  }
}

void pack_pairs_across_rows(const uint16_t* src, int64_t src_stride, int64_t K, int64_t cols,
                            uint32_t* dst, int64_t pair_stride, int64_t col_stride) {
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* lo = src + k * src_stride;
    const uint16_t* hi = k + 1 < K ? lo + src_stride : nullptr;
    uint32_t* d = dst + (k / 2) * pair_stride;
    if (hi)
      for (int64_t c = 0; c < cols; ++c)
        d[c * col_stride] = uint32_t(lo[c]) | (uint32_t(hi[c]) << 16);
    else
      for (int64_t c = 0; c < cols; ++c) d[c * col_stride] = lo[c];
  }
}

#ifdef JAX_MFA_X86
namespace {

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
// The register block's loops must be unrolled for the accumulators to live in
// registers (GCC -O2 keeps them in memory otherwise).
#define UNROLL _Pragma("GCC unroll 8")

// One register block: MR rows x NV vectors of 16 columns (the last one masked
// by `last`). MR * NV accumulators stay in registers across the whole K loop;
// each B vector is loaded once per pair and reused by the MR rows.
template <int MR, int NV>
BF16_TARGET void block(int64_t pairs, float alpha, const uint32_t* A, int64_t lda,
                       const uint32_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc,
                       __mmask16 last) {
  __m512 c[MR][NV];
  UNROLL for (int m = 0; m < MR; ++m)
    UNROLL for (int v = 0; v < NV; ++v) c[m][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint32_t* b = B + kp * ldb;
    __m512i bv[NV];
    UNROLL for (int v = 0; v < NV; ++v)
      bv[v] = v == NV - 1 ? _mm512_maskz_loadu_epi32(last, b + 16 * v)
                          : _mm512_loadu_si512(reinterpret_cast<const void*>(b + 16 * v));
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m512i a = _mm512_set1_epi32(int(A[m * lda + kp]));
      UNROLL for (int v = 0; v < NV; ++v)
        c[m][v] = _mm512_dpbf16_ps(c[m][v], (__m512bh)a, (__m512bh)bv[v]);
    }
  }
  const __m512 al = _mm512_set1_ps(alpha);
  UNROLL for (int m = 0; m < MR; ++m)
    UNROLL for (int v = 0; v < NV; ++v) {
      const __mmask16 k = v == NV - 1 ? last : __mmask16(0xffff);
      float* out = C + m * ldc + 16 * v;
      __m512 r = _mm512_mul_ps(c[m][v], al);
      if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(k, out));
      _mm512_mask_storeu_ps(out, k, r);
    }
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
}
// 16 floats to bfloat16 (round to nearest even, subnormals to 0), widened to
// the low halves of 16 words.
BF16_TARGET inline __m512i bf16_words(__mmask16 k, const float* x) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x)));
}

constexpr int kMaxRows = 6, kMaxVectors = 4;  // 24 accumulators of 32 registers
using BlockFn = void (*)(int64_t, float, const uint32_t*, int64_t, const uint32_t*, int64_t,
                         bool, float*, int64_t, __mmask16);

template <int MR>
constexpr BlockFn row_of[kMaxVectors] = {block<MR, 1>, block<MR, 2>, block<MR, 3>, block<MR, 4>};
constexpr const BlockFn* kBlocks[kMaxRows] = {row_of<1>, row_of<2>, row_of<3>,
                                              row_of<4>, row_of<5>, row_of<6>};

void avx512_gemm(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A,
                 int64_t lda, const uint32_t* B, int64_t ldb, bool accumulate, float* C,
                 int64_t ldc) {
  // Column panels of B (pairs x 64 words) stay in L1 while all rows pass.
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kMaxVectors) {
    const int64_t width = std::min<int64_t>(16 * kMaxVectors, N - n0);
    const int64_t nv = (width + 15) / 16, tail = width - 16 * (nv - 1);
    const __mmask16 last = __mmask16((1u << tail) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int64_t mr = std::min<int64_t>(kMaxRows, M - m0);
      kBlocks[mr - 1][nv - 1](pairs, alpha, A + m0 * lda, lda, B + n0, ldb, accumulate,
                              C + m0 * ldc + n0, ldc, last);
    }
  }
}

#ifdef JAX_MFA_AMX
#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

// Palette 1 tile configuration (64 bytes, the layout LDTILECFG reads).
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Tiles 0-3: float accumulators C(i, j) = tile 2i + j; 4-5: A rows i; 6-7: B
// columns j. Every tile is 16 rows x 64 bytes: 16 x 16 floats, or 16 rows of
// 16 bfloat16 pairs, which is the pair layout of cpu_bf16.h (a B row is one
// pair index, an A row one output row).
//
// Both operands are first copied into whole tiles, 1 KiB each, contiguous and
// zero-padded at the edges: every tile load reads 16 consecutive 64-byte rows
// (in place, the rows of a K^T operand lie S words apart, 16 KiB at S = 4096)
// and edges need no special case. The copy is cheap next to the products
// (each copied word takes part in 4 M or 4 N flops).
//
// Tile (rt, ct) of X (rows x cols words, row stride ld), rows 16 rt.. and
// columns 16 ct.., goes to dst + (rt * rt_stride + ct * ct_stride) * 256.
AMX_TARGET void pack_tiles(const uint32_t* X, int64_t ld, int64_t rows, int64_t cols,
                           uint32_t* dst, int64_t rt_stride, int64_t ct_stride) {
  const int64_t row_tiles = (rows + 15) / 16, col_tiles = (cols + 15) / 16;
  for (int64_t r = 0; r < row_tiles * 16; ++r) {
    uint32_t* d = dst + (r / 16) * rt_stride * 256 + (r % 16) * 16;
    for (int64_t ct = 0; ct < col_tiles; ++ct) {
      const __mmask16 k = r < rows ? tail_mask(cols - 16 * ct) : __mmask16(0);
      _mm512_store_si512(d + ct * ct_stride * 256,
                         _mm512_maskz_loadu_epi32(k, X + r * ld + 16 * ct));
    }
  }
}

// Where the A tiles of a product lie: packed (tile kt of row tile mt at
// base + (mt * next + kt) * 256 words, 64-byte rows), or the operand itself
// when its rows are whole tiles (tile kt of row tile mt at
// base + mt * 16 * ld + 16 kt words, rows ld words apart): Q and P rows, whose
// row runs of 64 bytes the tile loads read in place instead of a copy.
struct ATiles {
  const uint32_t* base;
  int64_t next, ld;  // packed: next = tiles per row tile, ld = 0; in place: ld words per row
  bool in_place() const { return ld > 0; }
  const uint32_t* at(int64_t mt, int64_t kt) const {
    return in_place() ? base + mt * 16 * ld + 16 * kt : base + (mt * next + kt) * 256;
  }
  int64_t stride() const { return in_place() ? ld * 4 : 64; }
};

// C block of MT x NT tiles at (m0, n0) from A's row tiles m0 / 16.. and the
// packed tiles of its B columns (Bt), k_tiles each. A C tile wholly inside C
// lives in C itself: with alpha = 1 the accumulator is loaded from C
// (accumulate) or zeroed, and stored back in place; with alpha != 1 and no
// accumulation it is stored in place and scaled there. Edge tiles, and
// alpha != 1 with accumulation, go through the float copy c:
// C = alpha * AB (+ C), masked.
template <int MT, int NT>
AMX_TARGET void amx_block(int64_t M, int64_t N, int64_t k_tiles, float alpha, const ATiles& A,
                          const uint32_t* Bt, int64_t b_next, bool accumulate, float* C,
                          int64_t ldc, int64_t m0, int64_t n0, float (*c)[256]) {
  const bool unit = alpha == 1.0f;
  const bool in_place_ok = unit || !accumulate;
  bool in_place[2][2];
  float* at[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      in_place[i][j] = in_place_ok && m0 + 16 * i + 16 <= M && n0 + 16 * j + 16 <= N;
      at[i][j] = C + (m0 + 16 * i) * ldc + n0 + 16 * j;
    }
  const int64_t stride = ldc * int64_t(sizeof(float)), sa = A.stride(), mt = m0 / 16;
  // Tile numbers are immediates: one macro use per accumulator.
#define JAX_MFA_AMX_START(t, i, j)                                  \
  if (unit && accumulate && in_place[i][j]) _tile_loadd(t, at[i][j], stride); \
  else _tile_zero(t)
#define JAX_MFA_AMX_FINISH(t, i, j)                                  \
  if (in_place[i][j]) _tile_stored(t, at[i][j], stride);             \
  else _tile_stored(t, c[t], 64)
  JAX_MFA_AMX_START(0, 0, 0);
  if constexpr (NT > 1) JAX_MFA_AMX_START(1, 0, 1);
  if constexpr (MT > 1) JAX_MFA_AMX_START(2, 1, 0);
  if constexpr (MT > 1 && NT > 1) JAX_MFA_AMX_START(3, 1, 1);
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    _tile_loadd(4, A.at(mt, kt), sa);
    if constexpr (MT > 1) _tile_loadd(5, A.at(mt + 1, kt), sa);
    _tile_loadd(6, Bt + kt * 256, 64);
    if constexpr (NT > 1) _tile_loadd(7, Bt + (b_next + kt) * 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  JAX_MFA_AMX_FINISH(0, 0, 0);
  if constexpr (NT > 1) JAX_MFA_AMX_FINISH(1, 0, 1);
  if constexpr (MT > 1) JAX_MFA_AMX_FINISH(2, 1, 0);
  if constexpr (MT > 1 && NT > 1) JAX_MFA_AMX_FINISH(3, 1, 1);
#undef JAX_MFA_AMX_START
#undef JAX_MFA_AMX_FINISH
  const __m512 al = _mm512_set1_ps(alpha);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      if (in_place[i][j]) {
        if (!unit)
          for (int r = 0; r < 16; ++r)
            _mm512_storeu_ps(at[i][j] + r * ldc,
                             _mm512_mul_ps(_mm512_loadu_ps(at[i][j] + r * ldc), al));
        continue;
      }
      const int64_t r0 = m0 + 16 * i, c0 = n0 + 16 * j;
      const int64_t nr = std::min<int64_t>(16, M - r0);
      const __mmask16 k = tail_mask(N - c0);
      for (int64_t r = 0; r < nr; ++r) {
        float* out = C + (r0 + r) * ldc + c0;
        __m512 v = _mm512_mul_ps(_mm512_load_ps(c[2 * i + j] + 16 * r), al);
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, out));
        _mm512_mask_storeu_ps(out, k, v);
      }
    }
}

// Cycles (time stamp counter) spent packing operands into tiles and running
// the tile products, summed over threads while counting is on (profiling).
std::atomic<bool> count_cycles{false};
std::atomic<int64_t> pack_cycles{0}, tile_cycles{0};

// Runs work(), adding its cycles to `total` while counting is on.
template <typename Work>
inline void counted(std::atomic<int64_t>& total, Work work) {
  if (!count_cycles.load(std::memory_order_relaxed)) return work();
  const int64_t t0 = int64_t(__rdtsc());
  work();
  total += int64_t(__rdtsc()) - t0;
}

// The tile configuration of every product: 8 tiles of 16 rows x 64 bytes.
AMX_TARGET void configure_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.bytes_per_row[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
AMX_TARGET void release_tiles() { _tile_release(); }  // back to the init state

// Set while an AmxTileScope holds this thread's tiles configured.
thread_local bool tiles_held = false;

// C = alpha A B (+ C) from A (ATiles) and B in tile layout (B column tile nt
// at Bt + nt * b_stride * 256, followed by its k_tiles tiles along K).
AMX_TARGET void amx_tiles(int64_t M, int64_t N, int64_t k_tiles, float alpha, const ATiles& A,
                          const uint32_t* Bt, int64_t b_stride, bool accumulate, float* C,
                          int64_t ldc) {
  const int64_t m_tiles = (M + 15) / 16, n_tiles = (N + 15) / 16;
  // Configured per product unless a scope holds the tiles: other code on this
  // thread (oneDNN in XLA or torch) may use them with another shape in between.
  const bool own_config = !tiles_held;
  if (own_config) configure_tiles();
  alignas(64) float c[4][256];
  // Blocks of 2 x 2 tiles: two A and two B tiles feed four products.
  for (int64_t mt = 0; mt < m_tiles; mt += 2) {
    const bool two_m = mt + 1 < m_tiles;
    for (int64_t nt = 0; nt < n_tiles; nt += 2) {
      const bool two_n = nt + 1 < n_tiles;
      using Block = decltype(&amx_block<1, 1>);
      const Block block = two_m ? (two_n ? &amx_block<2, 2> : &amx_block<2, 1>)
                                : (two_n ? &amx_block<1, 2> : &amx_block<1, 1>);
      block(M, N, k_tiles, alpha, A, Bt + nt * b_stride * 256, b_stride, accumulate, C, ldc,
            16 * mt, 16 * nt, c);
    }
  }
  if (own_config) release_tiles();  // no 8 KiB of tile state to save on a switch
}

struct Aligned {
  alignas(64) uint32_t words[256];
};

// Operands in pair layout: copied into per-thread tiles first.
AMX_TARGET void amx_gemm(int64_t M, int64_t N, int64_t pairs, float alpha, int terms,
                         const uint32_t* const* A, int64_t lda, const uint32_t* const* B,
                         int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  // The terms' products are one K loop: term t's tiles follow term t - 1's.
  const int64_t m_tiles = (M + 15) / 16, n_tiles = (N + 15) / 16;
  const int64_t term_tiles = (pairs + 15) / 16, k_tiles = terms * term_tiles;
  thread_local std::vector<Aligned> a_tiles, b_tiles;
  if (a_tiles.size() < size_t(m_tiles * k_tiles)) a_tiles.resize(size_t(m_tiles * k_tiles));
  if (b_tiles.size() < size_t(n_tiles * k_tiles)) b_tiles.resize(size_t(n_tiles * k_tiles));
  uint32_t* At = a_tiles.data()->words;
  uint32_t* Bt = b_tiles.data()->words;
  counted(pack_cycles, [&] {
    for (int t = 0; t < terms; ++t) {
      // A row tile mt: k_tiles tiles from mt * k_tiles; B column tile nt: likewise.
      pack_tiles(A[t], lda, M, pairs, At + t * term_tiles * 256, k_tiles, 1);
      pack_tiles(B[t], ldb, pairs, N, Bt + t * term_tiles * 256, 1, k_tiles);
    }
  });
  counted(tile_cycles, [&] {
    amx_tiles(M, N, k_tiles, alpha, ATiles{At, k_tiles, 0}, Bt, k_tiles, accumulate, C, ldc);
  });
}

// B already in tile layout; A read in place where its rows are whole tiles
// (M and pairs multiples of 16), else copied into per-thread tiles.
AMX_TARGET void amx_gemm_b_tiles(int64_t M, int64_t N, int64_t pairs, float alpha,
                                 const uint32_t* A, int64_t lda, const uint32_t* Bt,
                                 int64_t b_stride, bool accumulate, float* C, int64_t ldc) {
  const int64_t m_tiles = (M + 15) / 16, k_tiles = (pairs + 15) / 16;
  ATiles a{A, 0, lda};
  if (M % 16 != 0 || pairs % 16 != 0) {
    thread_local std::vector<Aligned> a_tiles;
    if (a_tiles.size() < size_t(m_tiles * k_tiles)) a_tiles.resize(size_t(m_tiles * k_tiles));
    uint32_t* At = a_tiles.data()->words;
    counted(pack_cycles, [&] { pack_tiles(A, lda, M, pairs, At, k_tiles, 1); });
    a = ATiles{At, k_tiles, 0};
  }
  counted(tile_cycles, [&] {
    amx_tiles(M, N, k_tiles, alpha, a, Bt, b_stride, accumulate, C, ldc);
  });
}
#endif  // JAX_MFA_AMX

}  // namespace

void bf16_gemm_sum(int64_t M, int64_t N, int64_t pairs, float alpha, int terms,
                   const uint32_t* const* A, int64_t lda, const uint32_t* const* B, int64_t ldb,
                   bool accumulate, float* C, int64_t ldc) {
#ifdef JAX_MFA_AMX
  if (bf16_dot_kind() == Bf16Dot::Amx)
    return amx_gemm(M, N, pairs, alpha, terms, A, lda, B, ldb, accumulate, C, ldc);
#endif
  for (int t = 0; t < terms; ++t)
    avx512_gemm(M, N, pairs, alpha, A[t], lda, B[t], ldb, accumulate || t > 0, C, ldc);
}

void bf16_gemm(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A, int64_t lda,
               const uint32_t* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  bf16_gemm_sum(M, N, pairs, alpha, 1, &A, lda, &B, ldb, accumulate, C, ldc);
}

BF16_TARGET void float_to_pairs_in_rows(const float* src, int64_t src_stride, int64_t rows,
                                        int64_t K, uint32_t* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * ld);
    for (int64_t i = 0; i < K; i += 16) {
      const __mmask16 k = tail_mask(K - i);
      _mm256_mask_storeu_epi16(d + i, k,
                               (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, src + r * src_stride + i)));
    }
    if (K % 2) d[K] = 0;
  }
}

namespace {
// The words (lo[c], hi[c]) of 16 columns (masked by m, zeros outside; hi
// null: high halves 0).
BF16_TARGET inline __m512i pair_words(__mmask16 m, const float* lo, const float* hi) {
  const __m512i w = bf16_words(m, lo);
  return hi ? _mm512_or_si512(w, _mm512_slli_epi32(bf16_words(m, hi), 16)) : w;
}
}  // namespace

BF16_TARGET void float_to_pairs_across_rows(const float* src, int64_t src_stride, int64_t K,
                                            int64_t cols, uint32_t* dst, int64_t ld) {
  for (int64_t k = 0; k < K; k += 2) {
    const float* lo = src + k * src_stride;
    const float* hi = k + 1 < K ? lo + src_stride : nullptr;
    uint32_t* d = dst + (k / 2) * ld;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = tail_mask(cols - c);
      _mm512_mask_storeu_epi32(d + c, m, pair_words(m, lo + c, hi ? hi + c : nullptr));
    }
  }
}

BF16_TARGET void float_to_b_tiles(const float* src, int64_t src_stride, int64_t K, int64_t cols,
                                  uint32_t* dst, int64_t b_stride) {
  const int64_t pairs = (K + 1) / 2, col_tiles = (cols + 15) / 16;
  for (int64_t kp = 0; kp < (pairs + 15) / 16 * 16; ++kp) {  // tile row kp % 16 of tile kp / 16
    uint32_t* d = dst + (kp / 16) * 256 + (kp % 16) * 16;
    if (kp >= pairs) {
      for (int64_t ct = 0; ct < col_tiles; ++ct)
        _mm512_store_si512(d + ct * b_stride * 256, _mm512_setzero_si512());
      continue;
    }
    const float* lo = src + 2 * kp * src_stride;
    const float* hi = 2 * kp + 1 < K ? lo + src_stride : nullptr;
    for (int64_t ct = 0; ct < col_tiles; ++ct) {
      const int64_t c = 16 * ct;
      _mm512_store_si512(d + ct * b_stride * 256,
                         pair_words(tail_mask(cols - c), lo + c, hi ? hi + c : nullptr));
    }
  }
}
namespace {
// Splits 16 floats (masked by k) into bfloat16 hi and lo halves.
BF16_TARGET inline void split16(__mmask16 k, __m512 x, uint16_t* hi, uint16_t* lo) {
  const __m256bh h = _mm512_cvtneps_pbh(x);
  const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(hf), _mm512_set1_ps(INFINITY),
                                              _CMP_NEQ_UQ);
  const __m256bh l = _mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, x, hf));
  _mm256_mask_storeu_epi16(hi, k, (__m256i)h);
  _mm256_mask_storeu_epi16(lo, k, (__m256i)l);
}
}  // namespace

BF16_TARGET void half_to_bf16_hi_lo(const uint16_t* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    split16(k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, src + i)), hi + i, lo + i);
  }
}

BF16_TARGET void float_to_bf16_hi_lo(const float* src, int64_t n, uint16_t* hi, uint16_t* lo) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    split16(k, _mm512_maskz_loadu_ps(k, src + i), hi + i, lo + i);
  }
}
#else
void half_to_bf16_hi_lo(const uint16_t*, int64_t, uint16_t*, uint16_t*) { std::abort(); }
void float_to_bf16_hi_lo(const float*, int64_t, uint16_t*, uint16_t*) { std::abort(); }
void float_to_pairs_in_rows(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  std::abort();
}
void float_to_pairs_across_rows(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  std::abort();
}
void float_to_b_tiles(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) {
  std::abort();
}
void bf16_gemm_sum(int64_t, int64_t, int64_t, float, int, const uint32_t* const*, int64_t,
                   const uint32_t* const*, int64_t, bool, float*, int64_t) {
  std::abort();  // bf16_dot_available() is false here
}
void bf16_gemm(int64_t, int64_t, int64_t, float, const uint32_t*, int64_t, const uint32_t*,
               int64_t, bool, float*, int64_t) {
  std::abort();
}
#endif

bool bf16_b_tiles_used() {
#ifdef JAX_MFA_AMX
  const char* choice = std::getenv("JAX_MFA_AMX_TILED_B");
  if (choice && std::strcmp(choice, "0") == 0) return false;
  return bf16_dot_kind() == Bf16Dot::Amx;
#else
  return false;
#endif
}

void pack_b_tiles(const uint32_t* B, int64_t ldb, int64_t pairs, int64_t N, uint32_t* dst,
                  int64_t b_stride) {
#ifdef JAX_MFA_AMX
  pack_tiles(B, ldb, pairs, N, dst, 1, b_stride);
#else
  std::abort();  // bf16_b_tiles_used() is false here
#endif
}

void bf16_gemm_b_tiles(int64_t M, int64_t N, int64_t pairs, float alpha, const uint32_t* A,
                       int64_t lda, const uint32_t* Bt, int64_t b_stride, bool accumulate,
                       float* C, int64_t ldc) {
#ifdef JAX_MFA_AMX
  amx_gemm_b_tiles(M, N, pairs, alpha, A, lda, Bt, b_stride, accumulate, C, ldc);
#else
  std::abort();  // bf16_b_tiles_used() is false here
#endif
}

void bf16_strip_block(int64_t k_tiles, const uint32_t* A, int64_t lda, const uint32_t* Bt,
                      int64_t b_stride, bool accumulate, float* C, int64_t ldc) {
#ifdef JAX_MFA_AMX
  amx_block<1, 2>(16, 32, k_tiles, 1.0f, ATiles{A, 0, lda}, Bt, b_stride, accumulate, C, ldc, 0,
                  0, nullptr);
#else
  (void)k_tiles, (void)A, (void)lda, (void)Bt, (void)b_stride, (void)accumulate, (void)C, (void)ldc;
  std::abort();  // bf16_b_tiles_used() is false here
#endif
}

AmxTileScope::AmxTileScope(bool on) {
#ifdef JAX_MFA_AMX
  if (on && !tiles_held && bf16_dot_kind() == Bf16Dot::Amx) {
    configure_tiles();
    held_ = tiles_held = true;
  }
#else
  (void)on;
#endif
}

AmxTileScope::~AmxTileScope() {
#ifdef JAX_MFA_AMX
  if (held_) {
    release_tiles();
    tiles_held = false;
  }
#endif
}

void bf16_count_cycles(bool on) {
#ifdef JAX_MFA_AMX
  count_cycles = on;
#endif
}

Bf16Cycles bf16_take_cycles() {
#ifdef JAX_MFA_AMX
  return {pack_cycles.exchange(0), tile_cycles.exchange(0)};
#else
  return {};
#endif
}

}  // namespace cpu
}  // namespace jax_mfa

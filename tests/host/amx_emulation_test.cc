// AMX-BF16 tile products of cpu/cpu_bf16.cc run on CPUs without AMX: the
// tile instructions are replaced by a scalar emulation (tile registers of
// 16 rows x 64 bytes, TDPBF16PS as float sums of bfloat16 pair products), and
// the products are compared with a double reference of the same bfloat16
// inputs. Covers the per-product tile copies (amx_gemm) and B operands copied
// once into tile layout (pack_b_tiles + amx_gemm_b_tiles) at tile offsets,
// with odd sizes, alpha != 1 and accumulation; A read in place where M and
// pairs are multiples of 16; float rows converted straight into tile layout
// (float_to_b_tiles, where the CPU has AVX512-BF16). Needs AVX-512 (the copies).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace emu {
struct Tile {
  uint8_t bytes[16][64];
};
Tile tiles[8];
inline float bf16(uint16_t h) {
  uint32_t w = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
inline void load(int t, const void* base, long stride) {
  for (int r = 0; r < 16; ++r)
    std::memcpy(tiles[t].bytes[r], static_cast<const uint8_t*>(base) + r * stride, 64);
}
inline void store(int t, void* base, long stride) {
  for (int r = 0; r < 16; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles[t].bytes[r], 64);
}
inline void zero(int t) { std::memset(&tiles[t], 0, sizeof(Tile)); }
// C[m][n] += sum over pairs k of A[m][k] . B[k][n] (each a pair of bfloat16).
inline void dpbf16ps(int c, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc;
      std::memcpy(&acc, tiles[c].bytes[m] + 4 * n, 4);
      for (int k = 0; k < 16; ++k) {
        uint16_t x[2], y[2];
        std::memcpy(x, tiles[a].bytes[m] + 4 * k, 4);
        std::memcpy(y, tiles[b].bytes[k] + 4 * n, 4);
        acc += bf16(x[0]) * bf16(y[0]) + bf16(x[1]) * bf16(y[1]);
      }
      std::memcpy(tiles[c].bytes[m] + 4 * n, &acc, 4);
    }
}
}  // namespace emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadd(t, base, stride) emu::load(t, base, stride)
#define _tile_stored(t, base, stride) emu::store(t, base, stride)
#define _tile_zero(t) emu::zero(t)
#define _tile_dpbf16ps(c, a, b) emu::dpbf16ps(c, a, b)
#define _tile_loadconfig(cfg) ((void)(cfg))
#define _tile_release() ((void)0)

#include "cpu/cpu_bf16.cc"

namespace {
using namespace jax_mfa::cpu;

int failures = 0;

// A (M x pairs words) and B (pairs x N words, pair layout) of random bfloat16.
std::vector<uint32_t> random_words(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> d;
  std::vector<uint32_t> w(static_cast<size_t>(n));
  for (auto& x : w) {
    uint16_t h[2];
    for (auto& v : h) {
      float f = d(rng);
      uint32_t u;
      std::memcpy(&u, &f, 4);
      v = uint16_t(u >> 16);
    }
    std::memcpy(&x, h, 4);
  }
  return w;
}

double pair_dot(uint32_t a, uint32_t b) {
  uint16_t x[2], y[2];
  std::memcpy(x, &a, 4);
  std::memcpy(y, &b, 4);
  return double(emu::bf16(x[0])) * emu::bf16(y[0]) + double(emu::bf16(x[1])) * emu::bf16(y[1]);
}

// C = alpha A B (+ C) on columns [col0, col0 + N) of a pairs x NB operand,
// by amx_gemm (pair layout) or amx_gemm_b_tiles (col0 a multiple of 16).
void check(int64_t M, int64_t N, int64_t pairs, int64_t col0, float alpha, bool accumulate,
           bool tiled, std::mt19937& rng) {
  const int64_t NB = col0 + N + 5, ldc = N + 3;
  const auto A = random_words(rng, M * pairs), B = random_words(rng, pairs * NB);
  std::vector<float> C(static_cast<size_t>(M * ldc));
  std::normal_distribution<float> d;
  for (auto& x : C) x = d(rng);
  const std::vector<float> C0 = C;
  if (tiled) {
    // A spare tile per column tile: B's stride differs from A's.
    const int64_t kt = (pairs + 15) / 16 + 1, nt = (NB + 15) / 16;
    std::vector<Aligned> packed(static_cast<size_t>(kt * nt));
    pack_b_tiles(B.data(), NB, pairs, NB, packed.data()->words, kt);
    amx_gemm_b_tiles(M, N, pairs, alpha, A.data(), pairs,
                     packed.data()->words + (col0 / 16) * kt * 256, kt, accumulate, C.data(), ldc);
  } else {
    const uint32_t* a = A.data();
    const uint32_t* b = B.data() + col0;
    amx_gemm(M, N, pairs, alpha, 1, &a, pairs, &b, NB, accumulate, C.data(), ldc);
  }
  double worst = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < ldc; ++n) {
      double want = C0[m * ldc + n];
      if (n < N) {
        double s = 0, mag = 0;
        for (int64_t k = 0; k < pairs; ++k) {
          s += pair_dot(A[m * pairs + k], B[k * NB + col0 + n]);
          mag += std::fabs(pair_dot(A[m * pairs + k], B[k * NB + col0 + n]));
        }
        want = alpha * s + (accumulate ? want : 0.0);
        const double err = std::fabs(C[m * ldc + n] - want) / (1e-30 + std::fabs(alpha) * mag + std::fabs(C0[m * ldc + n]));
        worst = std::max(worst, err);
      } else if (C[m * ldc + n] != float(want)) {
        worst = 1;  // a column past N was written
      }
    }
  if (!(worst < 1e-5)) {
    std::printf("FAIL M=%lld N=%lld pairs=%lld col0=%lld alpha=%g acc=%d tiled=%d: %g\n",
                (long long)M, (long long)N, (long long)pairs, (long long)col0, alpha,
                int(accumulate), int(tiled), worst);
    ++failures;
  }
}

// float_to_b_tiles against float_to_pairs_across_rows + pack_b_tiles: the
// same words, padding included (tiles poisoned first), for odd K and cols.
void check_float_to_b_tiles(int64_t K, int64_t cols, std::mt19937& rng) {
  const int64_t src_stride = cols + 7, pairs = (K + 1) / 2;
  const int64_t kt = (pairs + 15) / 16 + 1, nt = (cols + 15) / 16;
  std::vector<float> src(static_cast<size_t>(K * src_stride));
  std::normal_distribution<float> d;
  for (auto& x : src) x = d(rng);
  std::vector<uint32_t> pair_layout(static_cast<size_t>(pairs * cols));
  float_to_pairs_across_rows(src.data(), src_stride, K, cols, pair_layout.data(), cols);
  std::vector<Aligned> want(static_cast<size_t>(kt * nt)), got(static_cast<size_t>(kt * nt));
  for (auto* v : {&want, &got})
    for (auto& t : *v) std::memset(t.words, 0xA5, sizeof(t.words));
  pack_b_tiles(pair_layout.data(), cols, pairs, cols, want.data()->words, kt);
  float_to_b_tiles(src.data(), src_stride, K, cols, got.data()->words, kt);
  if (std::memcmp(want.data(), got.data(), want.size() * sizeof(Aligned)) != 0) {
    std::printf("FAIL float_to_b_tiles K=%lld cols=%lld\n", (long long)K, (long long)cols);
    ++failures;
  }
}
}  // namespace

int main() {
  std::mt19937 rng(12);
  for (bool tiled : {false, true})
    for (int64_t M : {1, 16, 17, 32, 40})
      for (int64_t N : {5, 16, 33})
        for (int64_t pairs : {3, 32, 41})
          for (int64_t col0 : {0, 32})
            for (float alpha : {1.0f, 0.37f})
              for (bool acc : {false, true}) check(M, N, pairs, col0, alpha, acc, tiled, rng);
  if (cpu_has_avx512_bf16()) {  // the float conversions
    for (int64_t K : {1, 2, 31, 32, 33, 64})
      for (int64_t cols : {1, 16, 37, 256}) check_float_to_b_tiles(K, cols, rng);
  } else {
    std::printf("float_to_b_tiles not checked: no AVX512-BF16\n");
  }
  if (failures) return 1;
  std::printf("all AMX emulation tests passed\n");
}

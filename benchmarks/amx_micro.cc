// Micro-benchmark of the bfloat16 AMX forward's inner loop on one thread
// (issue 12): one (batch, head) pair, T=S=L, 256-row query blocks against
// 256-key blocks, Q K^T -> softmax -> P V in the kernels' layouts and with the
// kernels' own product functions (cpu/cpu_bf16.h), arranged as:
//   per-product: strips of 16 rows, tiles configured in every product;
//   strips:      strips of 16 rows inside an AmxTileScope (the kernels at H < 128);
//   strips 32:   strips of 32 rows (2 x 2 tile blocks, JAX_MFA_DOT_STRIP=32);
//   pipelined:   the software pipeline of the kernels at H >= 128 (Q K^T of the
//                next strip and P V of the previous one between softmax rows).
// Each is timed with and without the softmax (row max, exp to bfloat16 P,
// rescaling the output rows), then the softmax alone; times per 16-row strip
// and 256-key block. Needs an x86-64 Linux CPU with AMX-BF16.
//   g++ -O2 -std=c++17 -Icpp benchmarks/amx_micro.cc cpp/cpu/cpu_simd.cc cpp/cpu/cpu_bf16.cc -o /tmp/amx_micro
//   taskset -c 0 /tmp/amx_micro 64 2048     # H, L
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/cpu_bf16.h"
#include "cpu/cpu_simd.h"

using namespace jax_mfa::cpu;

namespace {

// n words, each a pair of bfloat16 drawn from N(0, 1) (scores of O(sqrt(H))).
std::vector<uint32_t> random_words(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> d;
  std::vector<uint32_t> w(size_t(n) + 16);
  for (auto& x : w) {
    const float a = d(rng), b = d(rng);
    uint32_t ua, ub;
    std::memcpy(&ua, &a, 4);
    std::memcpy(&ub, &b, 4);
    x = (ua >> 16) | (ub >> 16 << 16);
  }
  return w;
}

template <typename T>
T* aligned(std::vector<T>& v) {  // tile loads want 64-byte rows
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

enum Mode { kPerProduct, kStrips, kStrips32, kPipelined };
const char* const kNames[] = {"per-product config", "strips (scope)", "strips of 32",
                              "pipelined"};

}  // namespace

int main(int argc, char** argv) {
  const int64_t H = argc > 1 ? std::atoll(argv[1]) : 64;
  const int64_t L = argc > 2 ? std::atoll(argv[2]) : 2048;
  const int64_t Bk = 256, Tq = 256;
  if (bf16_dot_kind() != Bf16Dot::Amx || H % 32 != 0 || L % Tq != 0) {
    std::printf("needs AMX-BF16, H a multiple of 32 and L of 256\n");
    return 0;
  }
  const RowOps& ops = row_ops();
  std::mt19937 rng(1);
  const int64_t hp = H / 2, k_kt = hp / 16, v_kt = L / 32;
  // K^T and V in tile layout (pack_b_tiles): column tile nt of K^T (16 keys)
  // at nt * k_kt tiles, of V (16 output columns) at nt * v_kt tiles.
  auto kt_w = random_words(rng, L * hp + 64), vt_w = random_words(rng, L * hp + 64);
  auto q_w = random_words(rng, L * hp + 64);
  const uint32_t* Kt = aligned(kt_w);
  const uint32_t* Vt = aligned(vt_w);
  const uint32_t* Q = aligned(q_w);  // pair layout, rows hp words apart
  std::vector<float> sb_v(32 * Bk + 16), acc_v(Tq * H + 16), m(Tq), l(Tq);
  std::vector<uint32_t> pw_v(32 * Bk / 2 + 16);
  float* Sb = aligned(sb_v);  // two 16-row strips (pipeline) or one of 32
  float* acc = aligned(acc_v);
  uint32_t* Pw = aligned(pw_v);
  const float scale = 1.0f / std::sqrt(float(H));

  auto softmax_row = [&](int64_t row, float* s, uint32_t* p) {
    const float mx = std::max(m[row], scale * ops.max(s, Bk));
    const float alpha = std::exp(m[row] - mx);
    l[row] = l[row] * alpha + ops.exp_sum_to_bfloat(s, reinterpret_cast<uint16_t*>(p), Bk, scale, mx);
    m[row] = mx;
    if (alpha != 1.0f) ops.scale(acc + row * H, H, alpha);
  };

  auto run = [&](Mode mode, bool softmax) {
    const int64_t R = mode == kStrips32 ? 32 : 16, strips = Tq / 16;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t q0 = 0; q0 < L; q0 += Tq) {
      std::fill(acc, acc + Tq * H, 0.0f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const AmxTileScope scope(mode != kPerProduct);
      for (int64_t j0 = 0; j0 < L; j0 += Bk) {
        const uint32_t* kb = Kt + (j0 / 16) * k_kt * 256;
        const uint32_t* vb = Vt + (j0 / 32) * 256;
        if (mode != kPipelined) {
          for (int64_t r0 = 0; r0 < Tq; r0 += R) {
            bf16_gemm_b_tiles(R, Bk, hp, 1.0f, Q + (q0 + r0) * hp, hp, kb, k_kt, false, Sb, Bk);
            for (int64_t r = 0; softmax && r < R; ++r) softmax_row(r0 + r, Sb + r * Bk, Pw + r * Bk / 2);
            bf16_gemm_b_tiles(R, H, Bk / 2, 1.0f, Pw, Bk / 2, vb, v_kt, true, acc + r0 * H, H);
          }
          continue;
        }
        // As attention_cpu.cc's pipelined_tile.
        const int64_t qk_blocks = Bk / 32, pv_blocks = H / 32;
        auto qk = [&](int64_t st, int64_t blk) {
          bf16_strip_block(k_kt, Q + (q0 + 16 * st) * hp, hp, kb + 2 * blk * k_kt * 256, k_kt,
                           false, Sb + (st % 2) * 16 * Bk + 32 * blk, Bk);
        };
        auto pv = [&](int64_t st, int64_t blk) {
          bf16_strip_block(Bk / 32, Pw + (st % 2) * 16 * Bk / 2, Bk / 2, vb + 2 * blk * v_kt * 256,
                           v_kt, true, acc + 16 * st * H + 32 * blk, H);
        };
        for (int64_t b = 0; b < qk_blocks; ++b) qk(0, b);
        for (int64_t st = 0; st < strips; ++st) {
          int64_t qk_done = 0, pv_done = 0;
          for (int64_t r = 0; r < 16; ++r) {
            if (st + 1 < strips)
              for (; qk_done < (r + 1) * qk_blocks / 16; ++qk_done) qk(st + 1, qk_done);
            if (st > 0)
              for (; pv_done < (r + 1) * pv_blocks / 16; ++pv_done) pv(st - 1, pv_done);
            if (softmax)
              softmax_row(16 * st + r, Sb + ((st % 2) * 16 + r) * Bk,
                          Pw + ((st % 2) * 16 + r) * Bk / 2);
          }
          for (; st + 1 < strips && qk_done < qk_blocks; ++qk_done) qk(st + 1, qk_done);
          for (; st > 0 && pv_done < pv_blocks; ++pv_done) pv(st - 1, pv_done);
        }
        for (int64_t b = 0; b < pv_blocks; ++b) pv(strips - 1, b);
      }
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  };

  // Every arrangement computes the same output (the last query block's).
  run(kPerProduct, true);
  const std::vector<float> want(acc, acc + Tq * H);
  for (Mode mode : {kStrips, kStrips32, kPipelined}) {
    run(mode, true);
    double worst = 0;
    for (int64_t i = 0; i < Tq * H; ++i)
      worst = std::max(worst, double(std::fabs(acc[i] - want[i])) / (1e-3 + std::fabs(want[i])));
    std::printf("%-20s output vs per-product: worst relative difference %.3g%s\n", kNames[mode],
                worst, worst < 1e-5 ? "" : "  MISMATCH");
  }

  const double blocks = double(L / Tq) * (L / Bk) * (Tq / 16);  // 16-row strip-blocks
  const double flops = 4.0 * L * L * H;
  for (Mode mode : {kPerProduct, kStrips, kStrips32, kPipelined})
    for (bool sm : {false, true}) {
      double best = 1e30;
      for (int rep = 0; rep < 5; ++rep) best = std::min(best, run(mode, sm));
      std::printf("H=%lld L=%lld %-20s softmax=%d: %.2f ms, %.0f ns per strip-block, %.0f GFLOP/s\n",
                  (long long)H, (long long)L, kNames[mode], int(sm), best, best * 1e6 / blocks,
                  flops / best * 1e-6);
    }
  {  // the softmax alone, on one strip's scores
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < int64_t(blocks); ++i)
      for (int64_t r = 0; r < 16; ++r) softmax_row(r, Sb + r * Bk, Pw + r * Bk / 2);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("softmax alone: %.2f ms, %.0f ns per strip-block\n", ms, ms * 1e6 / blocks);
  }
  return 0;
}

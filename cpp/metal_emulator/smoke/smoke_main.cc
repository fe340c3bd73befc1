// Smoke test of the emulator's C++ API (built in the normal build; run it by hand).
#include <cstdio>
#include <vector>

#include "metal_emulator/runtime.h"

namespace me = jax_mfa::metal_emulator;

int main() {
  std::vector<float> x(64), y(64, 1.0f);
  for (int i = 0; i < 64; ++i) x[i] = float(i);
  float a = 2.0f;
  me::DispatchArgs args;
  args.grid = {2, 1, 1};
  args.threads = {32, 1, 1};
  args.buffers = {{x.data(), x.size() * 4}, {y.data(), y.size() * 4}, {&a, sizeof a}};
  args.threadgroup_memory = {32 * sizeof(float)};
  me::Error e = me::dispatch("axpy_float", args);
  if (!e.ok()) {
    std::printf("axpy_float failed: %s\n", e.message.c_str());
    return 1;
  }
  for (int i = 0; i < 64; ++i)
    if (y[i] != 2.0f * float(i) + 1.0f) {
      std::printf("wrong result at %d: %g\n", i, y[i]);
      return 1;
    }
  me::DispatchArgs racy;
  racy.threads = {32, 1, 1};
  racy.buffers = {{y.data(), y.size() * 4}};
  racy.threadgroup_memory = {128};
  jax_mfa::InlineRunner inline_runner;
  e = me::dispatch("racy", racy, inline_runner);
  if (e.kind != me::ErrorKind::kRace) {
    std::printf("race not reported\n");
    return 1;
  }
  std::printf("ok (%zu kernels); expected race report: %s\n", me::kernel_names().size(), e.message.c_str());
  return 0;
}

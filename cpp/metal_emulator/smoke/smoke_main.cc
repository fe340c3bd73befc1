// Smoke test of the emulator's C++ API (built in the normal build; run it by hand).
#include <cstdint>
#include <cstdio>
#include <string>
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
  // The instruction profile through the C++ API: per lane 4 + 4 bytes read and
  // 4 written in device memory, 4 written and 4 read in threadgroup memory;
  // one threadgroup barrier per simdgroup.
  args.profile = true;
  me::Profile prof;
  e = me::dispatch("axpy_float", args, me::runner_with_workers(1), &prof);
  const auto count = [&](const char* name) {
    for (int c = 0; c < me::Profile::kNumCounters; ++c)
      if (std::string(me::Profile::counter_name(c)) == name) return prof.total[c];
    return uint64_t(~0ull);
  };
  if (!e.ok() || prof.threadgroups != 2 || prof.simdgroups_per_threadgroup != 1 ||
      count("device_bytes_read") != 64 * 8 || count("device_bytes_written") != 64 * 4 ||
      count("threadgroup_bytes_read") != 64 * 4 || count("threadgroup_bytes_written") != 64 * 4 ||
      count("threadgroup_barriers") != 2 || prof.per_simdgroup.size() != 1) {
    std::printf("wrong profile (%s)\n", e.message.c_str());
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

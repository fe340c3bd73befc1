// The "metal-emulated" backend: the Metal kernels of metal/ run by the Metal
// emulator (cpp/metal_emulator) on the CPU, with its race, divergence, bounds,
// threadgroup-memory and write-conflict checkers on. A verification path, not
// a fast one. The launch plan is the one the Metal launcher uses.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "metal_emulator/runtime.h"
#include "metal_host/attention_plan.h"
#include "metal_host/metal_backend.h"

namespace jax_mfa {
namespace {

using metal_host::KernelLaunch;
using metal_host::HostBuffers;

metal_host::GpuFamily emulated_family() {
  const char* s = std::getenv("JAX_MFA_EMULATED_FAMILY");
  if (s && (std::strcmp(s, "apple7") == 0 || std::strcmp(s, "m1") == 0))
    return metal_host::GpuFamily::Apple7;
  return metal_host::GpuFamily::Apple9;
}

class EmulatorExecutor final : public metal_host::KernelExecutor {
 public:
  explicit EmulatorExecutor(TaskRunner& runner) : runner_(runner) {}

  Status run(const KernelLaunch& launch, const HostBuffers& buffers) override {
    AttentionParams params = launch.params;
    // Absent operands get a small placeholder the kernels never touch.
    std::vector<std::vector<char>> placeholders(launch.args.size());
    metal_emulator::DispatchArgs args;
    args.threads = {uint32_t(launch.threads_per_group), 1, 1};
    args.check = std::getenv("JAX_MFA_EMULATOR_NOCHECK") == nullptr;
    // A seed interleaves the threads in a random order between barriers.
    if (const char* seed = std::getenv("JAX_MFA_EMULATOR_SEED")) {
      args.has_seed = true;
      args.seed = std::strtoull(seed, nullptr, 10);
    }
    args.buffers.push_back({&params, sizeof(params)});
    for (size_t i = 0; i < launch.args.size(); ++i) {
      const auto& a = launch.args[i];
      void* ptr = const_cast<void*>(buffers.get(a.arg));
      if (a.bytes == 0 || ptr == nullptr) {
        placeholders[i].assign(16, 0);
        args.buffers.push_back({placeholders[i].data(), 0});
      } else {
        args.buffers.push_back({ptr, a.bytes});
      }
    }
    for (const metal_host::Chunk& c : launch.chunks) {
      params.group_offset = int32_t(c.group_offset);
      args.grid = {uint32_t(c.groups), 1, 1};
      const metal_emulator::Error e = metal_emulator::dispatch(launch.kernel, args, runner_);
      if (!e.ok()) return Status::Error("metal-emulated: " + e.message);
    }
    return Status::Ok();
  }

 private:
  TaskRunner& runner_;
};

}  // namespace

Status metal_emulated_attention_forward(const AttentionProblem& p, DType dtype,
                                        const ForwardBuffers& b, TaskRunner& runner) {
  EmulatorExecutor exec(runner);
  return metal_host::run_forward(p, dtype, emulated_family(), b, exec);
}

Status metal_emulated_attention_backward(const AttentionProblem& p, DType dtype,
                                         const BackwardBuffers& b, TaskRunner& runner) {
  EmulatorExecutor exec(runner);
  return metal_host::run_backward(p, dtype, emulated_family(), b, exec);
}

}  // namespace jax_mfa

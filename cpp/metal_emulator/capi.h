// C entry points of a kernel library compiled at run time by
// jax_mfa.metal_emulator.compile_source (loaded with ctypes). Include once per
// shared library, after the kernels.
#pragma once

#include <cstring>

#include "metal_emulator/runtime.h"

#define JAX_MFA_EMU_EXPORT extern "C" __attribute__((visibility("default")))

JAX_MFA_EMU_EXPORT int jax_mfa_emu_abi_version() { return 1; }

JAX_MFA_EMU_EXPORT int jax_mfa_emu_num_kernels() { return int(metal::detail::registry().size()); }

JAX_MFA_EMU_EXPORT const char* jax_mfa_emu_kernel_name(int i) {
  auto& r = metal::detail::registry();
  return i >= 0 && size_t(i) < r.size() ? r[i]->name.c_str() : nullptr;
}

// Writes 6 int64 per parameter (binding, index, space, is_pointer, is_const,
// size); returns the number of parameters, or -1 for an unknown kernel.
JAX_MFA_EMU_EXPORT int jax_mfa_emu_kernel_params(const char* name, int64_t* out, int max_params) {
  std::vector<jax_mfa::metal_emulator::ParamDesc> ps;
  if (!jax_mfa::metal_emulator::kernel_params(name, &ps)) return -1;
  for (size_t i = 0; i < ps.size() && int(i) < max_params; ++i) {
    int64_t* o = out + 6 * i;
    o[0] = ps[i].binding;
    o[1] = ps[i].index;
    o[2] = ps[i].space;
    o[3] = ps[i].is_pointer;
    o[4] = ps[i].is_const;
    o[5] = int64_t(ps[i].size);
  }
  return int(ps.size());
}

JAX_MFA_EMU_EXPORT int jax_mfa_emu_dispatch(const char* name, const uint32_t* grid, const uint32_t* threads,
                                            int nbuf, void* const* ptrs, const uint64_t* sizes, int ntg,
                                            const uint64_t* tg_lengths, int has_seed, uint64_t seed, int check,
                                            char* err, int errlen) {
  jax_mfa::metal_emulator::DispatchArgs a;
  for (int i = 0; i < 3; ++i) a.grid[i] = grid[i], a.threads[i] = threads[i];
  for (int i = 0; i < nbuf; ++i) a.buffers.push_back({ptrs[i], size_t(sizes[i])});
  for (int i = 0; i < ntg; ++i) a.threadgroup_memory.push_back(size_t(tg_lengths[i]));
  a.has_seed = has_seed != 0;
  a.seed = seed;
  a.check = check != 0;
  const auto e = jax_mfa::metal_emulator::dispatch(name, a);
  if (err && errlen > 0) {
    std::strncpy(err, e.message.c_str(), size_t(errlen - 1));
    err[errlen - 1] = 0;
  }
  return int(e.kind);
}

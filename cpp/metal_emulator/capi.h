// C entry points of a kernel library compiled at run time by
// jax_mfa.metal_emulator.compile_source (loaded with ctypes). Include once per
// shared library, after the kernels.
#pragma once

#include <cstring>

#include "metal_emulator/runtime.h"

#define JAX_MFA_EMU_EXPORT extern "C" __attribute__((visibility("default")))

JAX_MFA_EMU_EXPORT int jax_mfa_emu_abi_version() { return 2; }

JAX_MFA_EMU_EXPORT int jax_mfa_emu_num_kernels() { return int(metal::detail::registry().size()); }

JAX_MFA_EMU_EXPORT const char* jax_mfa_emu_kernel_name(int i) {
  auto& r = metal::detail::registry();
  return i >= 0 && size_t(i) < r.size() ? r[i]->name.c_str() : nullptr;
}

// Writes 8 int64 per parameter (binding, index, space, is_pointer, is_const,
// size, function constant index or -1, used); returns the number of
// parameters, or -1 for an unknown kernel.
JAX_MFA_EMU_EXPORT int jax_mfa_emu_kernel_params(const char* name, int64_t* out, int max_params) {
  std::vector<jax_mfa::metal_emulator::ParamDesc> ps;
  if (!jax_mfa::metal_emulator::kernel_params(name, &ps)) return -1;
  for (size_t i = 0; i < ps.size() && int(i) < max_params; ++i) {
    int64_t* o = out + 8 * i;
    o[0] = ps[i].binding;
    o[1] = ps[i].index;
    o[2] = ps[i].space;
    o[3] = ps[i].is_pointer;
    o[4] = ps[i].is_const;
    o[5] = int64_t(ps[i].size);
    o[6] = ps[i].function_constant;
    o[7] = ps[i].used;
  }
  return int(ps.size());
}

// Function constants declared in the library: count, and for each its name
// and (index, type (metal::detail::FcType), size).
JAX_MFA_EMU_EXPORT int jax_mfa_emu_num_function_constants() {
  return int(metal::detail::function_constant_registry().size());
}
JAX_MFA_EMU_EXPORT const char* jax_mfa_emu_function_constant(int i, int64_t* index_type_size) {
  auto& r = metal::detail::function_constant_registry();
  if (i < 0 || size_t(i) >= r.size()) return nullptr;
  index_type_size[0] = r[i].index;
  index_type_size[1] = r[i].type;
  index_type_size[2] = r[i].size;
  return r[i].name.c_str();
}

// Names of the profile's counters (metal::detail::Counter order).
JAX_MFA_EMU_EXPORT int jax_mfa_emu_num_counters() { return metal::detail::kNumCounters; }
JAX_MFA_EMU_EXPORT const char* jax_mfa_emu_counter_name(int c) { return metal::detail::counter_name(c); }

// fc_index/fc_bits: `nfc` function constant values. workers < 0: the default
// pool; else a pool of that many threads. With profile != 0, prof_out
// receives 4 + kNumCounters * (2 + max_simdgroups) uint64: threads per
// threadgroup, simdgroups per threadgroup, threadgroups, threadgroup memory
// bytes, total[], max_simdgroup[], per_simdgroup[s][] for s < max_simdgroups.
JAX_MFA_EMU_EXPORT int jax_mfa_emu_dispatch(const char* name, const uint32_t* grid, const uint32_t* threads,
                                            int nbuf, void* const* ptrs, const uint64_t* sizes, int ntg,
                                            const uint64_t* tg_lengths, int nfc, const int64_t* fc_index,
                                            const uint64_t* fc_bits, int has_seed, uint64_t seed, int check,
                                            int workers, int profile, uint64_t* prof_out, int max_simdgroups,
                                            char* err, int errlen) {
  jax_mfa::metal_emulator::DispatchArgs a;
  for (int i = 0; i < nfc; ++i) a.function_constants.push_back({int(fc_index[i]), fc_bits[i]});
  a.profile = profile != 0;
  for (int i = 0; i < 3; ++i) a.grid[i] = grid[i], a.threads[i] = threads[i];
  for (int i = 0; i < nbuf; ++i) a.buffers.push_back({ptrs[i], size_t(sizes[i])});
  for (int i = 0; i < ntg; ++i) a.threadgroup_memory.push_back(size_t(tg_lengths[i]));
  a.has_seed = has_seed != 0;
  a.seed = seed;
  a.check = check != 0;
  jax_mfa::metal_emulator::Profile prof;
  auto& runner = workers < 0 ? jax_mfa::metal_emulator::default_runner()
                             : jax_mfa::metal_emulator::runner_with_workers(workers);
  const auto e = jax_mfa::metal_emulator::dispatch(name, a, runner, &prof);
  if (e.ok() && a.profile && prof_out) {
    constexpr int kN = jax_mfa::metal_emulator::Profile::kNumCounters;
    prof_out[0] = prof.threads_per_threadgroup;
    prof_out[1] = prof.simdgroups_per_threadgroup;
    prof_out[2] = prof.threadgroups;
    prof_out[3] = prof.threadgroup_memory_bytes;
    uint64_t* o = prof_out + 4;
    for (int c = 0; c < kN; ++c) o[c] = prof.total[c], o[kN + c] = prof.max_simdgroup[c];
    o += 2 * kN;
    for (int s = 0; s < max_simdgroups && size_t(s) < prof.per_simdgroup.size(); ++s)
      for (int c = 0; c < kN; ++c) o[s * kN + c] = prof.per_simdgroup[s][c];
  }
  if (err && errlen > 0) {
    std::strncpy(err, e.message.c_str(), size_t(errlen - 1));
    err[errlen - 1] = 0;
  }
  return int(e.kind);
}

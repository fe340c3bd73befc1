#include "metal_host/host_policy.h"

#include <algorithm>
#include <numeric>

namespace jax_mfa {
namespace metal_host {

DeviceChoice choose_device(const std::vector<DeviceDescription>& enumerated,
                           const std::function<std::optional<DeviceDescription>()>& system_default) {
  DeviceChoice choice;
  for (size_t i = 0; i < enumerated.size(); ++i) {
    if (enumerated[i].apple7) {
      choice.source = DeviceChoice::Enumerated;
      choice.index = int(i);
      choice.family = enumerated[i].apple9 ? GpuFamily::Apple9 : GpuFamily::Apple7;
      return choice;
    }
  }
  const std::optional<DeviceDescription> fallback = system_default();
  if (fallback && fallback->apple7) {
    choice.source = DeviceChoice::SystemDefault;
    choice.family = fallback->apple9 ? GpuFamily::Apple9 : GpuFamily::Apple7;
    return choice;
  }
  std::string seen;
  for (const DeviceDescription& d : enumerated) seen += (seen.empty() ? "" : ", ") + d.name;
  if (fallback) seen += (seen.empty() ? "" : ", ") + fallback->name + " (system default)";
  choice.reason = seen.empty()
                      ? "no Metal device found (MTLCopyAllDevices and "
                        "MTLCreateSystemDefaultDevice returned none)"
                      : "no Metal device of the Apple7 family or later (M1+) among: " + seen;
  return choice;
}

WrapPlan plan_wrapped_regions(const std::vector<HostRange>& operands, size_t page_size) {
  WrapPlan plan;
  plan.bindings.assign(operands.size(), RegionBinding{});
  // Page ranges [first, last) of the non-empty operands, sorted by start.
  struct Pages {
    uintptr_t first, last;
    size_t operand;
  };
  std::vector<Pages> pages;
  for (size_t i = 0; i < operands.size(); ++i) {
    if (operands[i].bytes == 0 || operands[i].ptr == nullptr) continue;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(operands[i].ptr);
    const uintptr_t end = begin + operands[i].bytes;
    pages.push_back({begin / page_size * page_size,
                     (end + page_size - 1) / page_size * page_size, i});
  }
  std::sort(pages.begin(), pages.end(),
            [](const Pages& a, const Pages& b) { return a.first < b.first; });
  // Merge ranges that share a page into one region.
  for (const Pages& p : pages) {
    if (plan.regions.empty() ||
        p.first >= plan.regions.back().base + plan.regions.back().length) {
      plan.regions.push_back({p.first, size_t(p.last - p.first)});
    } else {
      WrappedRegion& r = plan.regions.back();
      r.length = std::max<size_t>(r.length, size_t(p.last - r.base));
    }
    const int region = int(plan.regions.size()) - 1;
    plan.bindings[p.operand] = {
        region, size_t(reinterpret_cast<uintptr_t>(operands[p.operand].ptr) -
                       plan.regions[region].base)};
  }
  return plan;
}

int64_t chunk_to_wait_for(int64_t next, int cap) {
  return next >= cap ? next - cap : -1;
}

namespace {
constexpr DType kMetalTypes[] = {DType::F32, DType::F16, DType::BF16};
}  // namespace

LibraryKey library_key(DType dtype, int64_t head_dim) { return {dtype, head_bucket(head_dim)}; }

int library_index(const LibraryKey& key) {
  int bucket = 0;
  while (bucket < kHeadBucketCount && kHeadBuckets[bucket] != key.head_pad) ++bucket;
  return int(key.dtype) * (kHeadBucketCount + 1) + bucket;
}

std::vector<std::pair<std::string, int>> library_macros(const LibraryKey& key, GpuFamily family) {
  int bucket_bit = 0;
  for (int b = 0; b < kHeadBucketCount; ++b)
    if (kHeadBuckets[b] == key.head_pad) bucket_bit = 1 << b;
  int dtype_bit = 0;
  for (int t = 0; t < 3; ++t)
    if (kMetalTypes[t] == key.dtype) dtype_bit = 1 << t;
  return {{"JAX_MFA_METAL_FAMILIES", family == GpuFamily::Apple9 ? 2 : 1},
          {"JAX_MFA_METAL_DTYPES", dtype_bit},
          {"JAX_MFA_METAL_HEADS", bucket_bit}};
}

std::vector<std::string> library_kernels(const LibraryKey& key, GpuFamily family) {
  std::vector<std::string> names;
  for (Pass pass : {Pass::Forward, Pass::BackwardQuery, Pass::BackwardKeyValue})
    names.push_back(kernel_name(pass, key.dtype, block_config(pass, family, key.dtype, key.head_pad)));
  // The split-key decode's partial and merge kernels (plan_decode).
  const BlockConfig decode{key.head_pad, 8, kDecodeCols, 0};
  names.push_back(kernel_name(Pass::DecodePartial, key.dtype, decode));
  names.push_back(kernel_name(Pass::DecodeMerge, key.dtype, decode));
  // The reduction of a split GQA group's partial dK/dV (plan_backward).
  names.push_back(kernel_name(Pass::BackwardKeyValueReduce, key.dtype, decode));
  return names;
}

}  // namespace metal_host
}  // namespace jax_mfa

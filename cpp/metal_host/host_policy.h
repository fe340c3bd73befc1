// Every decision of the Metal launcher that does not need Metal itself, in
// plain C++ so that tests run it on any machine (tests/host/): which device to
// use, how XLA's host buffers are wrapped without copying, the byte budget of
// the fallback buffer pool, how many command buffers may be in flight, and
// which library (storage type x head-dim bucket) a kernel is compiled in.
// metal_backend.mm only turns these answers into Metal calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "attention/backend.h"
#include "metal_host/attention_plan.h"

namespace jax_mfa {
namespace metal_host {

// ---- Device selection ------------------------------------------------------
// What the launcher learns about one MTLDevice.
struct DeviceDescription {
  std::string name;
  bool apple7 = false;  // supportsFamily:MTLGPUFamilyApple7 (M1 or later)
  bool apple9 = false;  // supportsFamily:MTLGPUFamilyApple9 (M3 or later)
};

struct DeviceChoice {
  enum Source { None, Enumerated, SystemDefault } source = None;
  int index = -1;  // into the enumerated list (Enumerated only)
  GpuFamily family = GpuFamily::Apple7;
  std::string reason;  // why no device was chosen (None only)
};

// MLX's policy: the first device of MTLCopyAllDevices() that supports Apple7;
// only if there is none, the system default device (asked lazily: on a
// dual-GPU Intel Mac creating it switches the system to the discrete GPU).
DeviceChoice choose_device(const std::vector<DeviceDescription>& enumerated,
                           const std::function<std::optional<DeviceDescription>()>& system_default);

// ---- Zero-copy wrapping of host buffers -------------------------------------
// newBufferWithBytesNoCopy wants a page-aligned start and a whole number of
// pages; XLA's CPU buffers are only 64-byte aligned and may share pages (or
// overlap: an input aliased to an output). Each operand is bound as an offset
// into a region made of the whole pages that contain it; operands whose page
// ranges overlap share one region, so no page is wrapped twice.
struct HostRange {
  const void* ptr = nullptr;
  size_t bytes = 0;  // 0: absent or empty operand (bound to a placeholder)
};
struct WrappedRegion {
  uintptr_t base = 0;  // page-aligned
  size_t length = 0;   // multiple of the page size
};
struct RegionBinding {
  int region = -1;  // -1: no region (empty operand)
  size_t offset = 0;
};
struct WrapPlan {
  std::vector<WrappedRegion> regions;
  std::vector<RegionBinding> bindings;  // one per HostRange, same order
};
WrapPlan plan_wrapped_regions(const std::vector<HostRange>& operands, size_t page_size);

// ---- Fallback buffer pool with a byte budget --------------------------------
// Reusable device buffers for the rare operand Metal refuses to wrap. Holds at
// most `budget_bytes` in total (a large call does not pin its buffers for the
// life of the process); best fit on take, oldest evicted on give.
template <typename Handle>
class BufferPool {
 public:
  explicit BufferPool(size_t budget_bytes) : budget_(budget_bytes) {}

  std::optional<Handle> take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    auto best = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (it->second >= bytes && (best == entries_.end() || it->second < best->second)) best = it;
    if (best == entries_.end()) return std::nullopt;
    Handle h = best->first;
    pooled_ -= best->second;
    entries_.erase(best);
    return h;
  }

  // Keeps `h` (of `capacity` bytes) for reuse if it fits the budget; returns
  // the handles the caller must now drop (evicted ones, or `h` itself).
  std::vector<Handle> give(Handle h, size_t capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<Handle> dropped;
    if (capacity > budget_) {
      dropped.push_back(h);
      return dropped;
    }
    while (pooled_ + capacity > budget_) {
      dropped.push_back(entries_.front().first);
      pooled_ -= entries_.front().second;
      entries_.pop_front();
    }
    entries_.emplace_back(h, capacity);
    pooled_ += capacity;
    return dropped;
  }

  size_t pooled_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pooled_;
  }
  size_t size() const {
    std::lock_guard<std::mutex> lock(mu_);
    return entries_.size();
  }

 private:
  const size_t budget_;
  mutable std::mutex mu_;
  std::deque<std::pair<Handle, size_t>> entries_;
  size_t pooled_ = 0;
};

// 256 MiB: enough for the fallback copies of typical calls.
constexpr size_t kBufferPoolBudget = size_t(256) << 20;

// ---- Command buffers in flight ------------------------------------------------
// A queue from newCommandQueue admits 64 uncommitted/uncompleted command
// buffers; one call keeps at most this many in flight (calls are serialised
// by the launcher, so this is also the process-wide number).
constexpr int kMaxCommandBuffersInFlight = 16;
// Before committing chunk `next` (0-based), the launcher waits for chunk
// `next - cap` to complete (returns -1 when nothing needs waiting for).
int64_t chunk_to_wait_for(int64_t next, int cap = kMaxCommandBuffersInFlight);

// ---- Libraries compiled on demand ------------------------------------------------
// The kernels are compiled per (storage type, head-dim bucket): 5 kernels
// (forward, dQ, dK/dV of the device's family; the decode partial and merge
// kernels), not the whole set.
struct LibraryKey {
  DType dtype = DType::F32;
  int head_pad = 0;
  bool operator==(const LibraryKey& o) const { return dtype == o.dtype && head_pad == o.head_pad; }
};
LibraryKey library_key(DType dtype, int64_t head_dim);
// A small integer naming the key (for caches).
int library_index(const LibraryKey& key);
// Preprocessor macros that restrict metal/attention.metal to that library's
// instantiations (see the JAX_MFA_METAL_* switches there).
std::vector<std::pair<std::string, int>> library_macros(const LibraryKey& key, GpuFamily family);
// The kernel names the library contains (in plan order: forward, dQ, dK/dV,
// decode partial, decode merge).
std::vector<std::string> library_kernels(const LibraryKey& key, GpuFamily family);

}  // namespace metal_host
}  // namespace jax_mfa

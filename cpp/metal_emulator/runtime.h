// C++ API of the Metal emulator: dispatch a registered MSL kernel by name.
//
// Kernels are registered by the generated glue of every .metal file compiled
// through the emulator (plain `kernel void f(...)` functions under their own
// name, templates through JAX_MFA_INSTANTIATE_KERNEL). Errors come back as an
// Error value; nothing is thrown across this API.
#pragma once

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/parallel.h"
#include "metal_emulator/metal_compat.h"

// Hidden visibility: every shared object gets its own registry, workers and
// statics (default-visibility inline statics would be merged process-wide).
#pragma GCC visibility push(hidden)

namespace jax_mfa {
namespace metal_emulator {

enum class ErrorKind : int {
  kOk = 0,
  kInvalidArgument = 1,    // unknown kernel, missing buffer, bad grid/threadgroup size, ...
  kRace = 2,               // threadgroup-memory race
  kDivergence = 3,         // barrier / SIMD-group divergence or deadlock
  kOutOfBounds = 4,        // device/constant buffer access out of bounds
  kThreadgroupMemory = 5,  // threadgroup access out of bounds, or over 32 KiB / bad length
  kWriteConflict = 6,      // two threadgroups wrote one device element (no atomics)
};

struct Error {
  ErrorKind kind = ErrorKind::kOk;
  std::string message;  // names the kernel, threadgroup, thread(s) and address
  bool ok() const { return kind == ErrorKind::kOk; }
};

// One [[buffer(i)]] argument: a device/constant buffer (pointer parameters), or
// the bytes of the value of a `constant T&` parameter.
struct BufferArg {
  void* data = nullptr;
  size_t size = 0;  // bytes; accesses outside [data, data + size) are reported
};

// The value of one function constant for a dispatch (Metal: one entry of
// MTLFunctionConstantValues): `bits` holds the value's bytes (bool, int, uint,
// float, half or bfloat, as the constant is declared).
struct FunctionConstantArg {
  int index = 0;  // n of [[function_constant(n)]]
  uint64_t bits = 0;
};

struct DispatchArgs {
  std::array<uint32_t, 3> grid{1, 1, 1};     // threadgroups per grid
  std::array<uint32_t, 3> threads{1, 1, 1};  // threads per threadgroup (product <= 1024)
  std::vector<BufferArg> buffers;            // index i binds [[buffer(i)]]
  std::vector<size_t> threadgroup_memory;    // index i binds [[threadgroup(i)]]; multiples of 16 bytes
  std::vector<FunctionConstantArg> function_constants;  // values of [[function_constant(n)]] constants
  bool has_seed = false;                     // false: deterministic round-robin order of threads
  uint64_t seed = 0;                         // random order of threads between barriers
  bool check = true;                         // race / bounds / write-conflict checking
  bool profile = false;                      // count instructions (Profile, see dispatch below)
};

// The instruction profile of one dispatch (docs/metal_emulator.md lists what
// each counter counts). counters[c] is indexed by metal::detail::Counter;
// counter_name(c) gives its name.
struct Profile {
  static constexpr int kNumCounters = metal::detail::kNumCounters;
  using Counters = std::array<uint64_t, kNumCounters>;
  uint32_t threads_per_threadgroup = 0;
  uint32_t simdgroups_per_threadgroup = 0;
  uint64_t threadgroups = 0;
  uint64_t threadgroup_memory_bytes = 0;  // dynamic [[threadgroup(i)]] lengths + kernel-scope arrays (largest)
  std::vector<Counters> per_simdgroup;    // [simdgroup index in threadgroup], summed over threadgroups
  Counters total{};                       // over all simdgroups of the dispatch
  Counters max_simdgroup{};               // element-wise maximum over all simdgroups of the dispatch
  static const char* counter_name(int c) { return metal::detail::counter_name(c); }
};

// Description of one kernel parameter (as read from its signature).
struct ParamDesc {
  int binding;    // metal::detail::BindKind: 0 buffer, 1 threadgroup, 2.. built-ins
  int index;      // n of [[buffer(n)]] / [[threadgroup(n)]]
  int space;      // 1 device, 2 constant, 3 threadgroup
  bool is_pointer;
  bool is_const;
  uint64_t size;  // sizeof the pointee / referenced type
  int function_constant;  // [[buffer(n), function_constant(c)]]: index of c (absent when false), else -1
  bool used;              // false: never named in the kernel's body, so it may stay unbound
};

// A TaskRunner backed by std::threads (hardware_concurrency - 1 workers; the
// calling thread takes part in parallel_for).
class ThreadPoolRunner final : public TaskRunner {
 public:
  explicit ThreadPoolRunner(int workers = -1) {
    if (workers < 0) {
      const unsigned hc = std::thread::hardware_concurrency();
      workers = hc > 1 ? int(hc) - 1 : 0;
    }
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~ThreadPoolRunner() override {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int64_t num_workers() const override { return int64_t(threads_.size()); }
  void schedule(std::function<void()> task) override {
    {
      std::lock_guard<std::mutex> l(mu_);
      q_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> f;
      {
        std::unique_lock<std::mutex> l(mu_);
        cv_.wait(l, [this] { return stop_ || !q_.empty(); });
        if (q_.empty()) return;
        f = std::move(q_.front());
        q_.pop_front();
      }
      f();
    }
  }
  std::vector<std::thread> threads_;
  std::deque<std::function<void()>> q_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

// The pool used by dispatch() without a runner: JAX_MFA_EMU_WORKERS workers
// if set, else hardware_concurrency() - 1 (the caller takes part as well).
inline ThreadPoolRunner& default_runner() {
  static ThreadPoolRunner* r = [] {
    const char* e = std::getenv("JAX_MFA_EMU_WORKERS");
    return new ThreadPoolRunner(e && *e ? std::max(0, std::atoi(e)) : -1);
  }();  // never destroyed (safe at exit)
  return *r;
}

// A pool of exactly `workers` std::threads (0: the calling thread alone),
// created on first use and kept for the process's lifetime.
inline ThreadPoolRunner& runner_with_workers(int workers) {
  static std::mutex mu;
  static std::vector<std::pair<int, ThreadPoolRunner*>> pools;
  std::lock_guard<std::mutex> l(mu);
  for (auto& p : pools)
    if (p.first == workers) return *p.second;
  pools.emplace_back(workers, new ThreadPoolRunner(workers));
  return *pools.back().second;
}

inline std::vector<std::string> kernel_names() {
  std::vector<std::string> v;
  for (auto& e : metal::detail::registry()) v.push_back(e->name);
  return v;
}

inline bool kernel_params(const std::string& name, std::vector<ParamDesc>* out) {
  const auto* k = metal::detail::find_kernel(name.c_str());
  if (!k) return false;
  out->clear();
  for (auto& p : k->params)
    out->push_back({p.kind, p.index, p.space, p.is_pointer != 0, p.is_const != 0, p.size, p.function_constant,
                    p.used != 0});
  return true;
}

namespace detail_rt {
inline Error make_error(ErrorKind k, const std::string& kernel, const std::string& m) {
  return Error{k, "kernel '" + kernel + "': " + m};
}
}  // namespace detail_rt

// Function constants declared in this binary: (name, index, type (metal::detail::FcType), size).
inline std::vector<metal::detail::FunctionConstantInfo> function_constants() {
  return metal::detail::function_constant_registry();
}

// Runs `kernel`; with args.profile and a non-null `profile`, fills it.
inline Error dispatch(const std::string& kernel, const DispatchArgs& args, TaskRunner& runner,
                      Profile* profile = nullptr) {
  namespace md = metal::detail;
  using detail_rt::make_error;
  const md::KernelEntry* k = md::find_kernel(kernel.c_str());
  if (!k) {
    std::string names;
    for (auto& n : kernel_names()) names += (names.empty() ? "" : ", ") + n;
    return Error{ErrorKind::kInvalidArgument, "no kernel named '" + kernel + "' (registered: " + names + ")"};
  }
  uint64_t nthreads = 1, ngroups = 1;
  for (int i = 0; i < 3; ++i) {
    if (args.threads[i] == 0 || args.grid[i] == 0)
      return make_error(ErrorKind::kInvalidArgument, kernel, "grid and threads per threadgroup must be >= 1");
    nthreads *= args.threads[i];
    ngroups *= args.grid[i];
  }
  if (nthreads > uint64_t(md::kMaxThreads))
    return make_error(ErrorKind::kInvalidArgument, kernel,
                      std::to_string(nthreads) + " threads per threadgroup exceed Metal's limit of 1024");
  size_t tg_total = 0;
  for (size_t i = 0; i < args.threadgroup_memory.size(); ++i) {
    const size_t len = args.threadgroup_memory[i];
    if (len % 16 != 0)
      return make_error(ErrorKind::kThreadgroupMemory, kernel,
                        "threadgroup(" + std::to_string(i) + ") length " + std::to_string(len) +
                            " is not a multiple of 16 bytes (required by Metal)");
    tg_total += len;
  }
  if (tg_total > md::kMaxThreadgroupMemory)
    return make_error(ErrorKind::kThreadgroupMemory, kernel,
                      "threadgroup memory request of " + std::to_string(tg_total) +
                          " bytes exceeds Metal's 32 KiB (32768 bytes) per threadgroup");
  md::Dispatch d;
  d.k = k;
  d.grid = metal::uint3(args.grid[0], args.grid[1], args.grid[2]);
  d.threads = metal::uint3(args.threads[0], args.threads[1], args.threads[2]);
  d.nthreads = int(nthreads);
  d.check = args.check;
  d.profile = args.profile;
  d.has_seed = args.has_seed;
  d.seed = args.seed;
  for (const auto& f : args.function_constants) d.function_constants.push_back({f.index, f.bits});
  size_t nbufs = args.buffers.size();
  for (const auto& p : k->params)
    if (p.kind == md::kBuffer && p.index >= 0) nbufs = std::max(nbufs, size_t(p.index) + 1);
  d.bufs.resize(nbufs);
  for (size_t i = 0; i < nbufs; ++i) {
    d.bufs[i].base = i < args.buffers.size() ? static_cast<char*>(args.buffers[i].data) : nullptr;
    d.bufs[i].size = i < args.buffers.size() ? args.buffers[i].size : 0;
    d.bufs[i].index = int(i);
    d.bufs[i].space = md::kDeviceSpace;
    d.bufs[i].checked = args.check;
    d.bufs[i].profile = args.profile;
  }
  // Arguments that do not exist in this dispatch (function constant false) or
  // that the kernel never names and the caller left unbound read as zeros
  // from here; the checker reports any access past their one element and any write.
  std::vector<std::unique_ptr<char[]>> dummies;
  std::vector<std::string> absent_why;
  absent_why.reserve(k->params.size());
  auto constant_value = [&](int index, bool* defined) -> uint64_t {
    for (const auto& f : d.function_constants)
      if (f.index == index) {
        *defined = true;
        return f.bits;
      }
    *defined = false;
    return 0;
  };
  // Zero-filled lazily by the OS (calloc), so untouched pages cost nothing.
  struct FreeShadow {
    void operator()(std::atomic<uint64_t>* p) const { std::free(p); }
  };
  std::vector<std::unique_ptr<std::atomic<uint64_t>, FreeShadow>> shadows;
  for (const auto& p : k->params) {
    if (p.kind == md::kBuffer) {
      if (p.index < 0)
        return make_error(ErrorKind::kInvalidArgument, kernel, "negative [[buffer(" + std::to_string(p.index) + ")]]");
      md::Region& r = d.bufs[p.index];
      bool absent = false;
      if (p.function_constant >= 0) {
        bool defined = false;
        absent = (constant_value(p.function_constant, &defined) & 0xFF) == 0;
        if (absent)
          absent_why.push_back("its [[function_constant(" + std::to_string(p.function_constant) + ")]] is " +
                               (defined ? "false" : "not defined"));
      }
      const bool unbound = size_t(p.index) >= args.buffers.size() || (!r.base && r.size == 0);
      if (!absent && unbound && !p.used) {
        absent = true;
        absent_why.push_back("unbound and never named by the kernel");
      }
      if (absent) {
        dummies.emplace_back(new char[std::max<uint64_t>(p.size, 16)]());
        r.base = dummies.back().get();
        r.size = p.size;
        r.space = p.space;
        r.owner = nullptr;
        r.absent = absent_why.back().c_str();
        continue;
      }
      if (size_t(p.index) >= args.buffers.size())
        return make_error(ErrorKind::kInvalidArgument, kernel, "[[buffer(" + std::to_string(p.index) + ")]] not provided");
      if (!p.is_pointer && r.size < p.size)
        return make_error(ErrorKind::kInvalidArgument, kernel,
                          "[[buffer(" + std::to_string(p.index) + ")]] needs " + std::to_string(p.size) +
                              " bytes for its constant value, got " + std::to_string(r.size));
      if (!r.base && r.size)
        return make_error(ErrorKind::kInvalidArgument, kernel, "null [[buffer(" + std::to_string(p.index) + ")]]");
      r.space = p.space;
      if (args.check && p.is_pointer && !p.is_const && !r.owner && r.size > 0) {
        void* mem = std::calloc(r.size, sizeof(std::atomic<uint64_t>));
        if (!mem) return make_error(ErrorKind::kInvalidArgument, kernel, "out of memory for the checker's shadow");
        shadows.emplace_back(static_cast<std::atomic<uint64_t>*>(mem));
        r.owner = shadows.back().get();
      }
    } else if (p.kind == md::kThreadgroupArg) {
      if (p.index < 0 || size_t(p.index) >= args.threadgroup_memory.size())
        return make_error(ErrorKind::kThreadgroupMemory, kernel,
                          "[[threadgroup(" + std::to_string(p.index) + ")]] has no threadgroup memory length set");
    }
  }
  d.tg.resize(args.threadgroup_memory.size());
  for (size_t i = 0; i < d.tg.size(); ++i) {
    d.tg[i].size = args.threadgroup_memory[i];
    d.tg[i].index = int(i);
    d.tg[i].space = md::kThreadgroupSpace;
    d.tg[i].checked = args.check;
    d.tg[i].profile = args.profile;
  }
  d.tg_dynamic = tg_total;
  struct ProfilingScope {  // counts this dispatch in profiling_dispatches() while it runs
    bool on;
    explicit ProfilingScope(bool p) : on(p) {
      if (on) md::profiling_dispatches().fetch_add(1);
    }
    ~ProfilingScope() {
      if (on) md::profiling_dispatches().fetch_sub(1);
    }
  } profiling_scope(args.profile);
  parallel_for(runner, int64_t(ngroups), [&](int64_t gi) {
    if (d.failed.load(std::memory_order_relaxed)) return;
    static thread_local std::unique_ptr<md::Worker> tw;
    if (!tw) tw.reset(new md::Worker());
    md::Worker* prev = md::tl_worker_ptr();
    md::tl_worker_ptr() = tw.get();
    md::run_group(*tw, d, uint64_t(gi));
    md::tl_worker_ptr() = prev;
    if (tw->failed) {
      std::lock_guard<std::mutex> l(d.mu);
      if (!d.failed.load()) {
        d.kind = tw->kind;
        d.msg = tw->msg;
        d.failed.store(true);
      }
    }
  });
  if (d.failed.load()) return Error{ErrorKind(d.kind), d.msg};
  if (args.profile && profile) {
    profile->threads_per_threadgroup = uint32_t(nthreads);
    profile->simdgroups_per_threadgroup = uint32_t((nthreads + 31) / 32);
    profile->threadgroups = ngroups;
    profile->threadgroup_memory_bytes = std::max<uint64_t>(d.prof_tg_memory, tg_total);
    profile->per_simdgroup.assign(d.prof_per_sg.begin(), d.prof_per_sg.end());
    profile->per_simdgroup.resize(profile->simdgroups_per_threadgroup, Profile::Counters{});
    profile->total = Profile::Counters{};
    for (const auto& sg : profile->per_simdgroup)
      for (int c = 0; c < Profile::kNumCounters; ++c) profile->total[c] += sg[c];
    profile->max_simdgroup = d.prof_max;
  }
  return Error{};
}

inline Error dispatch(const std::string& kernel, const DispatchArgs& args, Profile* profile = nullptr) {
  return dispatch(kernel, args, default_runner(), profile);
}

}  // namespace metal_emulator
}  // namespace jax_mfa

#pragma GCC visibility pop

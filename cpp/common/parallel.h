// A blocking parallel-for over an abstract pool of worker threads.
//
// The FFI handlers adapt XLA's intra-op thread pool to TaskRunner; the caller
// thread always takes part, so the loop makes progress even when the pool is
// busy or absent.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

namespace jax_mfa {

class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  // Worker threads besides the caller (0: run everything on the caller).
  virtual int64_t num_workers() const = 0;
  virtual void schedule(std::function<void()> task) = 0;
};

// Runs on the caller only.
class InlineRunner final : public TaskRunner {
 public:
  int64_t num_workers() const override { return 0; }
  void schedule(std::function<void()> task) override { task(); }
};

// Calls fn(slot, i) for every i in [0, n), spread over `helpers` workers of
// the runner plus the caller, and returns when all calls have finished. `slot`
// in [0, helpers] names the participating thread (for per-thread
// accumulators). `fn` must not throw.
template <typename Fn>
void parallel_for_slots(TaskRunner& runner, int64_t n, int64_t helpers, const Fn& fn) {
  if (n <= 0) return;
  helpers = std::min<int64_t>({helpers, runner.num_workers(), n - 1});
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(int64_t(0), i);
    return;
  }
  // Shared state outlives this frame: a helper that starts after the loop has
  // finished finds no index left and never touches `fn`.
  struct State {
    std::atomic<int64_t> next{0}, slot{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const Fn* body = &fn;
  auto work = [state, body, n] {
    const int64_t slot = state->slot.fetch_add(1);
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n; ++finished) (*body)(slot, i);
    if (finished == 0) return;
    std::lock_guard<std::mutex> lock(state->mu);
    state->done += finished;
    if (state->done == n) state->cv.notify_all();
  };
  for (int64_t h = 0; h < helpers; ++h) runner.schedule(work);
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

// Calls fn(i) for every i in [0, n) on all the runner's workers and the caller.
template <typename Fn>
void parallel_for(TaskRunner& runner, int64_t n, const Fn& fn) {
  parallel_for_slots(runner, n, runner.num_workers(),
                     [&fn](int64_t, int64_t i) { fn(i); });
}

}  // namespace jax_mfa

// Threads for the CPU kernels (attention_cpu.cc, conv_cpu.cc): each call splits its work items
// between the calling thread and XLA's intra-op thread pool (the pool the FFI hands to the handler),
// so that the kernels share XLA's threads instead of adding their own beside them.
#ifndef LDM_JAX_KERNELS_PARALLEL_H_
#define LDM_JAX_KERNELS_PARALLEL_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace {

inline int NumThreads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Where a kernel call runs: XLA's thread pool and how many threads to use in all (the `threads`
// attribute, 0 = the CPUs this process may run on).
struct Workers {
  xla::ffi::ThreadPool* pool;
  int threads;

  Workers(xla::ffi::ThreadPool* pool, int64_t threads)
      : pool(pool), threads(threads > 0 ? static_cast<int>(threads) : NumThreads()) {}
};

// Runs work(item, state) for items 0..items-1 on the calling thread and up to threads - 1 tasks
// of the pool, each with its own State; items are handed out in order (consecutive items of one
// example share a State). A task that starts after the caller has run out of items does nothing,
// so the caller never waits for a task the busy pool has not started.
template <typename State, typename Work>
void ParallelFor(int64_t items, const Workers& workers, Work work) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int> running{0};
    std::atomic<bool> closed{false};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [&work, items](Shared& s) {
    State state;
    for (int64_t item = s.next++; item < items; item = s.next++) work(item, state);
  };
  const int tasks = static_cast<int>(std::min<int64_t>(workers.threads, items)) - 1;
  for (int t = 0; t < tasks; ++t) {
    workers.pool->Schedule([shared, &run] {
      shared->running++;
      if (!shared->closed) run(*shared);  // `run` lives on the caller's stack until running == 0
      shared->running--;
    });
  }
  run(*shared);
  shared->closed = true;
  while (shared->running > 0) std::this_thread::yield();
}

}  // namespace

#endif  // LDM_JAX_KERNELS_PARALLEL_H_

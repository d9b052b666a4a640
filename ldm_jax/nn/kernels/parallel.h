// Threads for the CPU kernels (attention_cpu.cc, conv_cpu.cc): each call splits its work items
// over a few threads of its own.
#ifndef LDM_JAX_KERNELS_PARALLEL_H_
#define LDM_JAX_KERNELS_PARALLEL_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

inline int NumThreads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs work(item, state) for items 0..items-1 on `threads` threads (this one included), each with
// its own State; items are handed out in order, so consecutive items of one pair share a State.
template <typename State, typename Work>
void ParallelFor(int64_t items, int threads, Work work) {
  std::atomic<int64_t> next{0};
  auto run = [&] {
    State state;
    for (int64_t item = next++; item < items; item = next++) work(item, state);
  };
  threads = static_cast<int>(std::min<int64_t>(threads, items));
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run);
  run();
  for (auto& th : pool) th.join();
}

}  // namespace

#endif  // LDM_JAX_KERNELS_PARALLEL_H_

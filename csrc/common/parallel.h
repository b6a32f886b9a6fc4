// A small parallel-for on std::thread (not OpenMP: torch ships its own OpenMP runtime and a
// second one in the same process is asking for trouble).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

// Hot CPU loops are compiled twice, for AVX2 and for the baseline ISA, and the loader picks
// one (GCC/Clang function multi-versioning on x86-64 Linux). -ffp-contract=off keeps both
// clones' arithmetic identical (no FMA), so results do not depend on the machine.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define DIGFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DIGFAST_CPU_CLONES
#endif
// Helpers called from a cloned function must be inlined into each clone to get its ISA.
#if defined(__GNUC__) || defined(__clang__)
#define DIGFAST_CPU_INLINE inline __attribute__((always_inline))
#else
#define DIGFAST_CPU_INLINE inline
#endif

namespace digfast {

// Number of threads worth starting for `items` items of `cost_per_item` units of work each,
// capped at `max_threads`: one thread per `min_work_per_thread` units, so small calls run
// on the caller's thread and pay no thread start-up (tens of microseconds each).
inline int threads_for(int64_t items, int64_t cost_per_item, int max_threads,
                       int64_t min_work_per_thread) {
  if (items <= 1 || max_threads <= 1) return 1;
  const int64_t work = items * std::max<int64_t>(cost_per_item, 1);
  const int64_t by_work = std::max<int64_t>(1, work / std::max<int64_t>(min_work_per_thread, 1));
  return static_cast<int>(std::min<int64_t>({static_cast<int64_t>(max_threads), items, by_work}));
}

// Calls fn(begin, end) on `num_threads` contiguous chunks of [0, n); the caller's thread
// runs the first chunk. Exceptions from workers are rethrown on the caller's thread.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, const Fn& fn) {
  if (n <= 0) return;
  num_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
  if (num_threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + num_threads - 1) / num_threads;
  std::vector<std::thread> workers;
  std::vector<std::exception_ptr> errors(num_threads);
  workers.reserve(num_threads - 1);
  for (int t = 1; t < num_threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin >= end) break;
    workers.emplace_back([&fn, &errors, t, begin, end] {
      try {
        fn(begin, end);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t{0}, std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace digfast

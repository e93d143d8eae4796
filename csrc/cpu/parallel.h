// parallel.h — work split for the CPU kernels: chunks taken from a shared counter, not a fixed share per thread.
//
// at::parallel_for gives each of torch's threads one fixed slice. When another process keeps one core busy, the
// thread on that core runs at a fraction of its speed and every parallel region (some 30 per decode token) waits
// for its slice: 2 threads became slower than 1. Here each thread takes the next chunk while chunks are left, so a
// thread that is not running takes none and the others finish the work; it only has to check in once at the end.
// Which thread computes a chunk changes nothing in the result: every output element is still computed by exactly
// one thread, in the same order.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

namespace gk::cpu {

// The most threads this (calling) thread's kernels may use; 0: torch's count. Set for one call by ThreadCap (the
// decode engine, when a step measured faster on fewer threads): per calling thread, so it never changes torch's
// setting nor another Python thread's calls.
inline thread_local int64_t tl_thread_cap = 0;

struct ThreadCap {
  int64_t saved;
  explicit ThreadCap(int64_t cap) : saved(tl_thread_cap) { tl_thread_cap = cap; }
  ~ThreadCap() { tl_thread_cap = saved; }
};

inline int64_t kernel_threads() {
  const int64_t nt = at::get_num_threads();
  return tl_thread_cap > 0 ? std::min(nt, tl_thread_cap) : nt;
}

// f(begin, end) over [0, n) in chunks taken from a shared counter, guided: each chunk is the remaining work over
// twice the threads (at least `grain`), so chunks start large (few grabs) and shrink towards the end (no thread is
// left holding a big last chunk while the others wait: a causal attention's tasks differ 32-fold in cost). Runs
// inline when there is one thread, too little work for two chunks, or already a parallel region.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t nt = kernel_threads();
  if (nt <= 1 || n <= grain || at::in_parallel_region()) {
    f(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(nt, (n + grain - 1) / grain), 1, [&](int64_t, int64_t) {
    int64_t start = next.load(std::memory_order_relaxed);
    while (start < n) {
      const int64_t len = std::max(grain, (n - start) / (2 * nt));
      if (next.compare_exchange_weak(start, start + len, std::memory_order_relaxed)) {
        f(start, std::min(n, start + len));
        start = next.load(std::memory_order_relaxed);
      }
    }
  });
}

}  // namespace gk::cpu

// Work splitting over XLA:CPU's intra-op thread pool, shared by the kernels in this folder.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
static inline void CpuRelax() { _mm_pause(); }
#else
static inline void CpuRelax() {}
#endif

#include "xla/ffi/api/ffi.h"

namespace l2d {

// Runs body(i) for every i in [0, items) on the calling thread and up to workers - 1 tasks of
// XLA's intra-op pool, and returns when all ran. Everyone claims items from an atomic
// counter until none are left: a task that starts late finds nothing to do, so the call never
// waits on a queued task (no deadlock when the pool is busy). Tasks hold the job by
// shared_ptr and call body only for an item they claimed, i.e. while the caller waits.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, int64_t workers, const Body& body) {
  workers = std::min(workers, items);
  if (workers <= 1) {
    for (int64_t i = 0; i < items; ++i) body(i);
    return;
  }
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto job = std::make_shared<Job>();
  const Body* fn = &body;
  auto run = [job, fn, items]() {
    for (int64_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < items;) {
      (*fn)(i);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < workers; ++i) pool.Schedule(decltype(run)(run));
  run();
  while (job->done.load(std::memory_order_acquire) < items) CpuRelax();
}

// Threads of the pool (the caller is one of them), at least 1.
inline int64_t PoolThreads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

}  // namespace l2d

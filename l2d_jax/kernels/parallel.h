// Work splitting over XLA:CPU's intra-op thread pool, shared by the kernels in this folder.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

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

// A team runs one program on the calling thread and up to workers - 1 tasks of XLA's pool:
// program(team) on each member, the same sequence of team.Phase(n, body) calls on each. A
// phase runs body(i) for every i in [0, n), each i claimed by one member, and returns on every
// member once all n ran (a barrier). Members that start late skip the phases that are over,
// so nobody waits for a task the pool has not started (no deadlock when it is busy); a task
// that starts after the call ended does nothing. One call then costs one wake-up of the
// pool however many phases it has. `phases` bounds the Phase calls of one program.
class Team {
 public:
  struct Job {
    explicit Job(int64_t phases) : counters(new Counters[phases]), phases(phases) {}
    struct Counters {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
    };
    std::unique_ptr<Counters[]> counters;
    const int64_t phases;
    std::atomic<int64_t> active{0};
    std::atomic<bool> closed{false};
  };

  explicit Team(Job* job) : job_(job) {}

  template <typename Body>
  void Phase(int64_t n, const Body& body) {
    if (phase_ >= job_->phases) std::abort();  // the program ran more phases than it declared
    Job::Counters& c = job_->counters[phase_++];
    for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      body(i);
      c.done.fetch_add(1, std::memory_order_release);
    }
    while (c.done.load(std::memory_order_acquire) < n) CpuRelax();
  }

 private:
  Job* job_;
  int64_t phase_ = 0;
};

template <typename Program>
void RunTeam(xla::ffi::ThreadPool& pool, int64_t workers, int64_t phases, const Program& program) {
  auto job = std::make_shared<Team::Job>(phases);
  const Program* fn = &program;
  for (int64_t i = 1; i < workers; ++i) {
    pool.Schedule([job, fn]() {
      job->active.fetch_add(1);  // sequentially consistent with the caller's closing below
      if (!job->closed.load()) {
        Team member(job.get());
        (*fn)(member);
      }
      job->active.fetch_sub(1);
    });
  }
  Team member(job.get());
  program(member);
  job->closed.store(true);  // then wait for the members still inside the program
  while (job->active.load() != 0) CpuRelax();
}

// The calling thread's scratch of at least `floats` floats, one buffer per Tag (grown, never
// shrunk).
template <typename Tag>
float* ThreadScratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// Part p of `parts` of [0, n): its range [begin, end), cut at multiples of `round` (the
// last part takes the rest).
inline std::pair<int64_t, int64_t> Share(int64_t n, int64_t parts, int64_t p, int64_t round) {
  const int64_t begin = (n * p / parts) / round * round;
  const int64_t end = p + 1 == parts ? n : (n * (p + 1) / parts) / round * round;
  return {begin, end};
}

// Threads of the pool (the caller is one of them), at least 1.
inline int64_t PoolThreads(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(1, pool.num_threads());
}

}  // namespace l2d

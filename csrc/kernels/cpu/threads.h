// The threads a multi-threaded CPU kernel runs on: the OpenMP team torch's own intra-op
// work uses. torch's wheels load their libgomp.so.1 before dtrain._C (dtrain imports torch
// first), and _C asks for a libgomp.so.1 by that name, so the loader hands it the same
// runtime: one pool, whose threads are already awake after torch's last op. Threads of our
// own would instead compete for the cores with torch's, which spin a while after every op
// (a [4096, 1024] LayerNorm on 2 threads right after a torch op: 3.2 ms, against 1.6 ms
// on the shared pool).
#pragma once

#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dtrain {
namespace kernels {

// f(k, team) on a team of up to `threads` threads, k = 0 .. team-1 (k = 0 is this thread).
// The team may be smaller than asked (inside another parallel region it is 1), so f must
// split its work by `team`. f must not throw.
template <class F>
void onThreads(int threads, F f) {
  if (threads <= 1) {
    f(0, 1);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  f(omp_get_thread_num(), omp_get_num_threads());
#else
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int k = 1; k < threads; ++k) pool.emplace_back([&f, k, threads] { f(k, threads); });
  f(0, threads);
  for (auto& th : pool) th.join();
#endif
}

}  // namespace kernels
}  // namespace dtrain

// The progress thread. Asynchronous calls queue here and run in order on one
// C++ thread; a synchronous call runs on the caller's thread (GIL released)
// when nothing is queued, and otherwise queues behind the rest and waits, so
// all calls of a process still run one at a time and in the order they were made.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace dtrain {

class Work {
 public:
  // Waits up to `timeout` seconds (< 0: forever). Returns false if still
  // running; rethrows the call's error if it failed.
  bool wait(double timeout);
  bool completed();
  // When the progress thread started and finished the call, in seconds of the monotonic
  // clock (CLOCK_MONOTONIC, Python's time.monotonic()); 0 until then.
  double startedAt() const { return started_.load(std::memory_order_acquire); }
  double finishedAt() const { return finished_.load(std::memory_order_acquire); }

  // How many threads of this process are blocked in wait() right now. The progress
  // thread spins for data only while someone waits on it; a call that nobody waits
  // for yet (a gradient bucket during backward) yields the core to the computation.
  static int waiters() { return waiters_.load(std::memory_order_relaxed); }
  // True on the progress thread, where queued asynchronous calls run.
  static bool onProgressThread();

 private:
  friend class Executor;
  void finish(std::exception_ptr err);

  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr err_;
  std::atomic<double> started_{0.0}, finished_{0.0};
  static std::atomic<int> waiters_;
};

class Executor {
 public:
  Executor() = default;
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  std::shared_ptr<Work> submit(std::function<void()> fn);
  // Runs `fn` now on this thread if the queue is idle, else after what is queued.
  void run(std::function<void()> fn);

 private:
  void loop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<Work>>> queue_;
  bool busy_ = false;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace dtrain

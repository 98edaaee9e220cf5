#include "collectives/progress.h"

#include <chrono>

namespace dtrain {

std::atomic<int> Work::waiters_{0};
namespace {
thread_local bool tlsProgressThread = false;

double monotonicNow() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

bool Work::onProgressThread() { return tlsProgressThread; }

void Work::finish(std::exception_ptr err) {
  finished_.store(monotonicNow(), std::memory_order_release);
  std::lock_guard<std::mutex> g(mu_);
  done_ = true;
  err_ = err;
  cv_.notify_all();
}

bool Work::wait(double timeout) {
  struct Count {
    Count() { waiters_.fetch_add(1, std::memory_order_relaxed); }
    ~Count() { waiters_.fetch_sub(1, std::memory_order_relaxed); }
  } count;
  std::unique_lock<std::mutex> g(mu_);
  if (timeout < 0) cv_.wait(g, [&] { return done_; });
  else if (!cv_.wait_for(g, std::chrono::duration<double>(timeout), [&] { return done_; })) return false;
  if (err_) std::rethrow_exception(err_);
  return true;
}

bool Work::completed() {
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}

Executor::~Executor() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

std::shared_ptr<Work> Executor::submit(std::function<void()> fn) {
  auto work = std::make_shared<Work>();
  std::lock_guard<std::mutex> g(mu_);
  if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
  queue_.emplace_back(std::move(fn), work);
  cv_.notify_all();
  return work;
}

void Executor::run(std::function<void()> fn) {
  {
    std::unique_lock<std::mutex> g(mu_);
    if (queue_.empty() && !busy_) {
      busy_ = true;
      g.unlock();
      std::exception_ptr err;
      try {
        fn();
      } catch (...) {
        err = std::current_exception();
      }
      g.lock();
      busy_ = false;
      cv_.notify_all();
      g.unlock();
      if (err) std::rethrow_exception(err);
      return;
    }
  }
  submit(std::move(fn))->wait(-1);
}

void Executor::loop() {
  tlsProgressThread = true;
  for (;;) {
    std::unique_lock<std::mutex> g(mu_);
    cv_.wait(g, [&] { return stop_ || (!queue_.empty() && !busy_); });
    if (queue_.empty()) return;  // stopping with nothing left
    auto item = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    g.unlock();
    std::exception_ptr err;
    item.second->started_.store(monotonicNow(), std::memory_order_release);
    try {
      item.first();
    } catch (...) {
      err = std::current_exception();
    }
    g.lock();
    busy_ = false;
    cv_.notify_all();
    g.unlock();
    item.second->finish(err);
  }
}

}  // namespace dtrain

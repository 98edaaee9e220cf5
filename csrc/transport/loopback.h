// In-process pairs over heap rings, one thread per rank: lets unit tests run
// the real collective algorithms without processes (gloo test/base_test.h).
#pragma once

#include <atomic>
#include <memory>
#include <vector>

#include "common/error.h"
#include "transport/ring_channel.h"
#include "transport/transport.h"

namespace dtrain {

// Rings for every ordered pair of `world` ranks; pairFor(i, j) is i's end to j.
class LoopbackFabric {
 public:
  LoopbackFabric(int world, size_t cap) : world_(world), cap_(cap) {
    size_t n = static_cast<size_t>(world) * world;
    memory_.resize(n);
    for (size_t k = 0; k < n; ++k) {
      memory_[k].reset(new (std::align_val_t(64)) uint8_t[RingChannel::bytesFor(cap)]());
      new (memory_[k].get()) RingHeader{};
    }
  }

  // Ring carrying bytes from `src` to `dst`.
  RingChannel ring(int src, int dst) {
    uint8_t* base = memory_[static_cast<size_t>(src) * world_ + dst].get();
    return RingChannel(reinterpret_cast<RingHeader*>(base), base + sizeof(RingHeader), cap_);
  }

  void poison(int rank) { dead_.store(rank + 1); }
  int dead() const { return dead_.load() - 1; }

 private:
  struct Free { void operator()(uint8_t* p) const { ::operator delete[](p, std::align_val_t(64)); } };
  int world_;
  size_t cap_;
  std::vector<std::unique_ptr<uint8_t[], Free>> memory_;
  std::atomic<int> dead_{0};
};

class LoopbackPair : public Pair {
 public:
  LoopbackPair(LoopbackFabric* fabric, int self, int peer)
      : Pair(peer), fabric_(fabric), out_(fabric->ring(self, peer)), in_(fabric->ring(peer, self)) {}

  size_t send(size_t max, Filler& fill) override {
    uint8_t* dst;
    size_t n = out_.writable(&dst);
    if (n == 0) return 0;
    n = fill(dst, n < max ? n : max);
    out_.commit(n);
    return n;
  }

  size_t recv(size_t max, Drainer& drain) override {
    const uint8_t* src;
    size_t n = in_.readable(&src);
    if (n == 0) return 0;
    n = drain(src, n < max ? n : max);
    in_.consume(n);
    return n;
  }

  void checkPeer() override {
    DTRAIN_CHECK(fabric_->dead() != peer_, kComm, "rank ", peer_, " died (loopback fabric poisoned)");
  }

  const char* kind() const override { return "loopback"; }

 private:
  LoopbackFabric* fabric_;
  RingChannel out_;
  RingChannel in_;
};

}  // namespace dtrain

// The algorithms, each a Collective the engine drives (see engine.h).
#pragma once

#include <algorithm>
#include <vector>

#include "collectives/engine.h"
#include "collectives/group.h"

namespace dtrain {

// Ring segments: `count` elements split over n ranks, the first count % n one longer.
inline uint64_t ringSegStart(uint64_t count, int n, int s) {
  return (count / n) * s + std::min<uint64_t>(s, count % n);
}
inline uint64_t ringSegCount(uint64_t count, int n, int s) {
  return count / n + (static_cast<uint64_t>(s) < count % n ? 1 : 0);
}

// Walks the segments of a stream: maps a byte position to (segment, offset).
class SegmentCursor {
 public:
  void add(uint64_t bytes) { ends_.push_back((ends_.empty() ? 0 : ends_.back()) + bytes); }
  uint64_t total() const { return ends_.empty() ? 0 : ends_.back(); }
  // Moves to the segment holding `pos` (positions only ever grow); returns its index.
  size_t seek(uint64_t pos) {
    while (k_ < ends_.size() && pos >= ends_[k_]) ++k_;
    return k_;
  }
  uint64_t start(size_t k) const { return k == 0 ? 0 : ends_[k - 1]; }
  uint64_t end(size_t k) const { return ends_[k]; }

 private:
  std::vector<uint64_t> ends_;
  size_t k_ = 0;
};

// Ring reduce-scatter (+ allgather): segment s of the buffer travels the ring,
// reduced at every hop. Out stream k carries segment (r + shift - k), in stream
// k reduces into segment (r + shift - k - 1), so what arrives at step k-1 is
// what leaves at step k: outs may run ahead of ins by exactly the first segment.
// shift 0 with allgather is allreduce; shift -1 without it is reduce_scatter
// (rank r ends up owning segment r).
class RingReduce : public Collective {
 public:
  RingReduce(Group& g, uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire, bool allgather,
             int shift, const Descriptor& d);
  uint64_t ready(size_t i) override;
  size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) override;
  size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) override;

 private:
  int segOf(int k) const { return ((r_ + shift_ - k) % n_ + n_) % n_; }
  uint64_t segStart(int s) const { return ringSegStart(count_, n_, s); }
  uint64_t segCount(int s) const { return ringSegCount(count_, n_, s); }
  void finalize(uint8_t* p, size_t n);

  uint8_t* buf_;
  DType dt_, wire_;
  RedOp op_;
  int n_, r_, shift_;
  bool allgather_;
  size_t dsz_, wsz_;
  uint64_t count_;
  SegmentCursor outCur_, inCur_;
};

// Every rank sends its whole buffer to every other rank and reduces locally in
// rank order: one hop of latency, for small tensors.
class DirectAllreduce : public Collective {
 public:
  DirectAllreduce(Group& g, uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire,
                  const Descriptor& d);
  size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) override;
  size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) override;
  void finish() override;

 private:
  uint8_t* buf_;
  uint8_t* scratch_;  // size() slots of `bytes_` wire bytes; slot r is our own contribution
  uint64_t count_, bytes_;
  DType dt_, wire_;
  RedOp op_;
  int n_, r_;
};

// Pipeline along the ring starting at the root.
class RingBroadcast : public Collective {
 public:
  RingBroadcast(Group& g, uint8_t* buf, uint64_t bytes, const Descriptor& d);
  uint64_t ready(size_t i) override;
  size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) override;
  size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) override;

 private:
  uint8_t* buf_;
  bool root_;
};

// Ring allgather of blocks that may differ in size: out k carries block (r-k),
// in k brings block (r-k-1).
class RingAllgather : public Collective {
 public:
  RingAllgather(Group& g, const uint8_t* in, uint8_t* out, const std::vector<uint64_t>& bytes,
                const Descriptor& d);
  uint64_t ready(size_t i) override;
  size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) override;
  size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) override;

 private:
  int blockOf(int k) const { return ((r_ - k) % n_ + n_) % n_; }
  const uint8_t* in_;
  uint8_t* out_;
  std::vector<uint64_t> offsets_;
  int n_, r_;
  SegmentCursor outCur_, inCur_;
};

// Point-to-point legs with independent buffers: alltoall, send, recv, barrier.
class Exchange : public Collective {
 public:
  explicit Exchange(const Descriptor& d) { desc = d; }
  void sendTo(Pair* p, int peer, const uint8_t* src, uint64_t bytes);
  void recvFrom(Pair* p, int peer, uint8_t* dst, uint64_t bytes);
  size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) override;
  size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) override;

 private:
  std::vector<const uint8_t*> src_;
  std::vector<uint8_t*> dst_;
};

}  // namespace dtrain

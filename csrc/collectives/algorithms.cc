#include "collectives/algorithms.h"

#include <algorithm>
#include <cstring>

#include "collectives/reduce_kernels.h"

namespace dtrain {

// ---------------------------------------------------------------- RingReduce

RingReduce::RingReduce(Group& g, uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire,
                       bool allgather, int shift, const Descriptor& d)
    : buf_(buf), dt_(dt), wire_(wire), op_(op), n_(g.size()), r_(g.rank()), shift_(shift),
      allgather_(allgather), dsz_(dtypeSize(dt)), wsz_(dtypeSize(wire)),
      count_(count) {
  desc = d;
  unit = wsz_;
  const int steps = allgather ? 2 * (n_ - 1) : n_ - 1;
  for (int k = 0; k < steps; ++k) {
    outCur_.add(segCount(segOf(k)) * wsz_);
    inCur_.add(segCount(segOf(k + 1)) * wsz_);
  }
  const int right = (r_ + 1) % n_, left = (r_ + n_ - 1) % n_;
  addOut(g.pair(right), right, outCur_.total());
  addIn(g.pair(left), left, inCur_.total());
}

uint64_t RingReduce::ready(size_t) { return segCount(segOf(0)) * wsz_ + ins[0].done; }

size_t RingReduce::produce(size_t, uint64_t pos, uint8_t* dst, size_t len) {
  const KernelTable& kt = kernels();
  size_t done = 0;
  while (done < len) {
    uint64_t p = pos + done;
    size_t k = outCur_.seek(p);
    size_t m = static_cast<size_t>(std::min<uint64_t>(len - done, outCur_.end(k) - p));
    uint64_t elem = segStart(segOf(static_cast<int>(k))) + (p - outCur_.start(k)) / wsz_;
    const uint8_t* src = buf_ + elem * dsz_;
    if (wire_ == dt_) std::memcpy(dst + done, src, m);
    else kt.encode(wire_, dst + done, reinterpret_cast<const float*>(src), m / wsz_);
    done += m;
  }
  return done;
}

size_t RingReduce::consume(size_t, uint64_t pos, const uint8_t* src, size_t len) {
  const KernelTable& kt = kernels();
  size_t done = 0;
  while (done < len) {
    uint64_t p = pos + done;
    size_t k = inCur_.seek(p);
    size_t m = static_cast<size_t>(std::min<uint64_t>(len - done, inCur_.end(k) - p));
    size_t elems = m / wsz_;
    uint64_t elem = segStart(segOf(static_cast<int>(k) + 1)) + (p - inCur_.start(k)) / wsz_;
    uint8_t* dst = buf_ + elem * dsz_;
    if (static_cast<int>(k) < n_ - 1) {  // reduce-scatter step
      if (wire_ == dt_) kt.reduce(dt_, op_, dst, src + done, elems);
      else kt.reduceWire(wire_, op_, reinterpret_cast<float*>(dst), src + done, elems);
      if (static_cast<int>(k) == n_ - 2) finalize(dst, elems);
    } else {  // allgather step
      if (wire_ == dt_) std::memcpy(dst, src + done, m);
      else kt.decode(wire_, reinterpret_cast<float*>(dst), src + done, elems);
    }
    done += m;
  }
  return done;
}

// The owner of a fully reduced segment applies what every rank must see: the
// average's division, and the wire's rounding (so all ranks hold identical bits).
void RingReduce::finalize(uint8_t* p, size_t n) {
  if (op_ == RedOp::kAvg) kernels().scale(dt_, p, n, 1.0 / n_);
  if (allgather_ && wire_ != dt_) roundTripWire(wire_, reinterpret_cast<float*>(p), n);
}

// ----------------------------------------------------------- DirectAllreduce

DirectAllreduce::DirectAllreduce(Group& g, uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire,
                                 const Descriptor& d)
    : buf_(buf), count_(count), bytes_(count * dtypeSize(wire)), dt_(dt), wire_(wire), op_(op),
      n_(g.size()), r_(g.rank()) {
  desc = d;
  unit = dtypeSize(wire);
  scratch_ = g.scratch(n_ * bytes_).data();
  uint8_t* own = scratch_ + r_ * bytes_;
  if (wire == dt) std::memcpy(own, buf, bytes_);
  else kernels().encode(wire, own, reinterpret_cast<const float*>(buf), count);
  for (int j = 0; j < n_; ++j) {
    if (j == r_) continue;
    addOut(g.pair(j), j, bytes_);
    addIn(g.pair(j), j, bytes_);
  }
}

size_t DirectAllreduce::produce(size_t, uint64_t pos, uint8_t* dst, size_t len) {
  std::memcpy(dst, scratch_ + r_ * bytes_ + pos, len);
  return len;
}

size_t DirectAllreduce::consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) {
  std::memcpy(scratch_ + ins[i].peer * bytes_ + pos, src, len);
  return len;
}

void DirectAllreduce::finish() {
  // Rank order, so every rank adds the same numbers in the same order.
  const KernelTable& kt = kernels();
  if (wire_ == dt_) {
    std::memcpy(buf_, scratch_, bytes_);
    for (int j = 1; j < n_; ++j) kt.reduce(dt_, op_, buf_, scratch_ + j * bytes_, count_);
  } else {
    float* out = reinterpret_cast<float*>(buf_);
    kt.decode(wire_, out, scratch_, count_);
    for (int j = 1; j < n_; ++j) kt.reduceWire(wire_, op_, out, scratch_ + j * bytes_, count_);
  }
  if (op_ == RedOp::kAvg) kt.scale(dt_, buf_, count_, 1.0 / n_);
}

// ------------------------------------------------------------- RingBroadcast

RingBroadcast::RingBroadcast(Group& g, uint8_t* buf, uint64_t bytes, const Descriptor& d)
    : buf_(buf), root_(g.rank() == d.root) {
  desc = d;
  const int n = g.size(), r = g.rank();
  const int right = (r + 1) % n, left = (r + n - 1) % n;
  if (!root_) addIn(g.pair(left), left, bytes);
  if (right != d.root) addOut(g.pair(right), right, bytes);
}

uint64_t RingBroadcast::ready(size_t i) { return root_ ? outs[i].total : ins[0].done; }

size_t RingBroadcast::produce(size_t, uint64_t pos, uint8_t* dst, size_t len) {
  std::memcpy(dst, buf_ + pos, len);
  return len;
}

size_t RingBroadcast::consume(size_t, uint64_t pos, const uint8_t* src, size_t len) {
  std::memcpy(buf_ + pos, src, len);
  return len;
}

// ------------------------------------------------------------- RingAllgather

RingAllgather::RingAllgather(Group& g, const uint8_t* in, uint8_t* out, const std::vector<uint64_t>& bytes,
                             const Descriptor& d)
    : in_(in), out_(out), n_(g.size()), r_(g.rank()) {
  desc = d;
  countMustMatch = false;  // blocks may differ in size by design
  offsets_.resize(n_);
  uint64_t off = 0;
  for (int i = 0; i < n_; ++i) {
    offsets_[i] = off;
    off += bytes[i];
  }
  if (in_ != out_ + offsets_[r_]) std::memcpy(out_ + offsets_[r_], in_, bytes[r_]);  // in place: already there
  for (int k = 0; k < n_ - 1; ++k) {
    outCur_.add(bytes[blockOf(k)]);
    inCur_.add(bytes[blockOf(k + 1)]);
  }
  const int right = (r_ + 1) % n_, left = (r_ + n_ - 1) % n_;
  addOut(g.pair(right), right, outCur_.total());
  addIn(g.pair(left), left, inCur_.total());
}

uint64_t RingAllgather::ready(size_t) { return outCur_.end(0) + ins[0].done; }

size_t RingAllgather::produce(size_t, uint64_t pos, uint8_t* dst, size_t len) {
  size_t done = 0;
  while (done < len) {
    uint64_t p = pos + done;
    size_t k = outCur_.seek(p);
    size_t m = static_cast<size_t>(std::min<uint64_t>(len - done, outCur_.end(k) - p));
    std::memcpy(dst + done, out_ + offsets_[blockOf(static_cast<int>(k))] + (p - outCur_.start(k)), m);
    done += m;
  }
  return done;
}

size_t RingAllgather::consume(size_t, uint64_t pos, const uint8_t* src, size_t len) {
  size_t done = 0;
  while (done < len) {
    uint64_t p = pos + done;
    size_t k = inCur_.seek(p);
    size_t m = static_cast<size_t>(std::min<uint64_t>(len - done, inCur_.end(k) - p));
    std::memcpy(out_ + offsets_[blockOf(static_cast<int>(k) + 1)] + (p - inCur_.start(k)), src + done, m);
    done += m;
  }
  return done;
}

// ------------------------------------------------------------------ Exchange

void Exchange::sendTo(Pair* p, int peer, const uint8_t* src, uint64_t bytes) {
  Leg& l = addOut(p, peer, bytes);
  l.count = l.hdr.count = bytes / dtypeSize(desc.dtype);
  src_.push_back(src);
}

void Exchange::recvFrom(Pair* p, int peer, uint8_t* dst, uint64_t bytes) {
  Leg& l = addIn(p, peer, bytes);
  l.count = bytes / dtypeSize(desc.dtype);
  dst_.push_back(dst);
}

size_t Exchange::produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) {
  std::memcpy(dst, src_[i] + pos, len);
  return len;
}

size_t Exchange::consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) {
  std::memcpy(dst_[i] + pos, src, len);
  return len;
}

}  // namespace dtrain

#include "collectives/engine.h"

#include <immintrin.h>
#include <poll.h>
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <cstring>
#include <sstream>

#include "collectives/group.h"
#include "collectives/progress.h"
#include "common/error.h"

namespace dtrain {

const char* kindName(Kind k) {
  switch (k) {
    case Kind::kAllreduce: return "allreduce";
    case Kind::kBroadcast: return "broadcast";
    case Kind::kAllgather: return "allgather";
    case Kind::kReduceScatter: return "reduce_scatter";
    case Kind::kAlltoall: return "alltoall";
    case Kind::kSend: return "send/recv";
    case Kind::kBarrier: return "barrier";
  }
  return "?";
}

namespace {
thread_local uint64_t tlsCallTag = 0;
}  // namespace

CallTag::CallTag(uint64_t tag) : prev_(tlsCallTag) { tlsCallTag = tag; }
CallTag::~CallTag() { tlsCallTag = prev_; }
uint64_t CallTag::current() { return tlsCallTag; }

uint64_t shapeTag(const std::vector<int64_t>& shape) {
  constexpr int64_t kDimLimit = int64_t(1) << 15;
  bool exact = shape.size() <= 4;
  for (int64_t d : shape) exact = exact && d >= 0 && d < kDimLimit;
  if (exact) {
    uint64_t tag = uint64_t(shape.size() + 1) << 60;
    for (size_t i = 0; i < shape.size(); ++i) tag |= uint64_t(shape[i]) << (15 * i);
    return tag;
  }
  uint64_t h = 1469598103934665603ull;  // FNV-1a over ndim and the dims
  auto mix = [&h](uint64_t v) {
    for (int b = 0; b < 8; ++b) h = (h ^ ((v >> (8 * b)) & 0xff)) * 1099511628211ull;
  };
  mix(shape.size());
  for (int64_t d : shape) mix(static_cast<uint64_t>(d));
  return h | (uint64_t(1) << 63);
}

std::string describeShapeTag(uint64_t tag) {
  std::ostringstream os;
  if (tag >> 63) {
    os << "shape #" << std::hex << (tag & ~(uint64_t(1) << 63));
    return os.str();
  }
  size_t ndim = static_cast<size_t>(tag >> 60) - 1;
  os << "shape (";
  for (size_t i = 0; i < ndim; ++i) os << (i ? ", " : "") << ((tag >> (15 * i)) & 0x7fff);
  os << (ndim == 1 ? ",)" : ")");
  return os.str();
}

std::string describeCall(const Descriptor& d) {
  std::ostringstream os;
  os << kindName(d.kind) << "(count=" << d.count << ", dtype=" << dtypeName(d.dtype);
  if (d.tag) os << ", " << describeShapeTag(d.tag);
  if (d.kind == Kind::kAllreduce || d.kind == Kind::kReduceScatter) os << ", op=" << redOpName(d.op);
  if (d.wire != d.dtype) os << ", compression=" << (d.wire == DType::kFloat16 ? "fp16" : "bf16");
  if (d.kind == Kind::kBroadcast) os << ", root=" << d.root;
  os << ")";
  if (d.kind != Kind::kSend) os << " as call #" << d.seq;
  return os.str();
}

std::string Collective::describe() const {
  std::ostringstream os;
  os << kindName(desc.kind);
  if (desc.kind != Kind::kSend) os << " #" << desc.seq;
  os << " of " << desc.count << " " << dtypeName(desc.dtype) << " ("
     << desc.count * dtypeSize(desc.dtype) << " bytes)";
  return os.str();
}

Leg& Collective::addOut(Pair* p, int peer, uint64_t bytes) {
  Leg l;
  l.pair = p;
  l.peer = peer;
  l.total = bytes;
  l.count = desc.count;
  l.hdr = desc;
  outs.push_back(l);
  return outs.back();
}

Leg& Collective::addIn(Pair* p, int peer, uint64_t bytes) {
  Leg l;
  l.pair = p;
  l.peer = peer;
  l.total = bytes;
  l.count = desc.count;
  ins.push_back(l);
  return ins.back();
}

namespace {

inline size_t roundDown(size_t n, size_t unit) { return unit == 1 ? n : n - n % unit; }

class OutFiller : public Filler {
 public:
  OutFiller(Collective& c, size_t i) : c_(c), i_(i) {}
  size_t operator()(uint8_t* dst, size_t cap) override {
    Leg& l = c_.outs[i_];
    size_t written = 0;
    if (l.hdrDone < sizeof(Descriptor)) {
      size_t k = std::min<size_t>(sizeof(Descriptor) - l.hdrDone, cap);
      std::memcpy(dst, reinterpret_cast<const uint8_t*>(&l.hdr) + l.hdrDone, k);
      l.hdrDone += static_cast<uint32_t>(k);
      written += k;
      if (l.hdrDone < sizeof(Descriptor)) return written;
    }
    if (l.done < l.total) {
      uint64_t ready = std::min(c_.ready(i_), l.total);
      size_t k = roundDown(std::min<uint64_t>(ready - std::min(ready, l.done), cap - written), c_.unit);
      if (k > 0) {
        size_t n = c_.produce(i_, l.done, dst + written, k);
        l.done += n;
        written += n;
      }
    }
    if (l.done == l.total && l.padDone < l.pad()) {
      size_t k = std::min<size_t>(l.pad() - l.padDone, cap - written);
      std::memset(dst + written, 0, k);
      l.padDone += static_cast<uint32_t>(k);
      written += k;
    }
    return written;
  }

 private:
  Collective& c_;
  size_t i_;
};

class InDrainer : public Drainer {
 public:
  InDrainer(Collective& c, Group& g, size_t i) : c_(c), g_(g), i_(i) {}
  size_t operator()(const uint8_t* src, size_t len) override {
    Leg& l = c_.ins[i_];
    size_t used = 0;
    if (l.hdrDone < sizeof(Descriptor)) {
      size_t k = std::min<size_t>(sizeof(Descriptor) - l.hdrDone, len);
      std::memcpy(reinterpret_cast<uint8_t*>(&l.hdr) + l.hdrDone, src, k);
      l.hdrDone += static_cast<uint32_t>(k);
      used += k;
      if (l.hdrDone < sizeof(Descriptor)) return used;
      validate(l);
    }
    if (l.done < l.total) {
      size_t k = roundDown(std::min<uint64_t>(l.total - l.done, len - used), c_.unit);
      if (k > 0) {
        size_t n = c_.consume(i_, l.done, src + used, k);
        l.done += n;
        used += n;
      }
    }
    if (l.done == l.total && l.padDone < l.pad()) {
      size_t k = std::min<size_t>(l.pad() - l.padDone, len - used);
      l.padDone += static_cast<uint32_t>(k);
      used += k;
    }
    return used;
  }

 private:
  void validate(const Leg& l) {
    Descriptor a = c_.desc;
    a.count = l.count;
    const Descriptor& b = l.hdr;
    int peerRank = g_.globalRank(l.peer);
    DTRAIN_CHECK(b.magic == kDescriptorMagic, kComm, "garbage from rank ", peerRank,
                 " where a call descriptor should be (magic ", std::hex, b.magic,
                 "): the stream is out of step, usually after an earlier error on that rank");
    bool same = a.kind == b.kind && a.dtype == b.dtype && a.wire == b.wire && a.op == b.op &&
                a.group == b.group && a.root == b.root && a.seq == b.seq && a.tag == b.tag &&
                (!c_.countMustMatch || a.count == b.count);
    DTRAIN_CHECK(same, kComm, "mismatched calls in group ", g_.name(), ": rank ", g_.globalRank(g_.rank()),
                 " called ", describeCall(a), " but rank ", peerRank, " called ", describeCall(b),
                 "; every rank must make the same collective calls in the same order with the same "
                 "sizes, dtypes and ops");
  }

  Collective& c_;
  Group& g_;
  size_t i_;
};

// Backs off while nothing moves, and checks health every few milliseconds.
class Waiter {
 public:
  Waiter(Group& g, Collective& c)
      : g_(g), c_(c), spinLimit_(g.spinLimit()), background_(Work::onProgressThread()) {
    lastProgress_ = lastCheck_ = Clock::now();
  }

  void progressed() {
    idle_ = 0;
    lastProgress_ = Clock::now();
  }

  void idle() {
    ++idle_;
    // In the background (an asynchronous call nobody waits for yet, typically while the
    // model computes), spinning would take the core from the computation: yield soon.
    const uint64_t limit = background_ && Work::waiters() == 0 ? std::min<uint64_t>(spinLimit_, 64) : spinLimit_;
    if (idle_ < limit) {
      _mm_pause();
      if ((idle_ & 1023) != 0) return;
    } else if (idle_ < limit + 32) {
      sched_yield();
    } else {
      sleepOrPoll(limit);
    }
    Clock::time_point now = Clock::now();
    if (now - lastCheck_ < std::chrono::milliseconds(10)) return;
    lastCheck_ = now;
    g_.checkHealth(c_, std::chrono::duration<double>(now - lastProgress_).count());
  }

 private:
  void sleepOrPoll(uint64_t limit) {
    pollfd fds[64];
    nfds_t n = 0;
    for (const auto* legs : {&c_.ins, &c_.outs})
      for (const Leg& l : *legs)
        if (!l.finished() && l.pair->pollFd() >= 0 && n < 64)
          fds[n++] = pollfd{l.pair->pollFd(), static_cast<short>(legs == &c_.ins ? POLLIN : POLLOUT), 0};
    // Sleep longer the longer we have been idle: short waits stay fast, long ones stay cheap.
    long us = idle_ < limit + 2000 ? 20 : 200;
    timespec ts{0, us * 1000};
    if (n > 0) ::ppoll(fds, n, &ts, nullptr);
    else ::nanosleep(&ts, nullptr);
  }

  Group& g_;
  Collective& c_;
  uint64_t idle_ = 0;
  uint64_t spinLimit_;
  bool background_;
  Clock::time_point lastProgress_;
  Clock::time_point lastCheck_;
};

size_t chunkBytes() {
  static size_t chunk = [] {
    const char* s = std::getenv("DTRAIN_CHUNK_BYTES");
    size_t v = s ? std::strtoull(s, nullptr, 10) : 0;
    return v >= 64 ? (v & ~size_t(63)) : size_t(128) << 10;
  }();
  return chunk;
}

}  // namespace

void runCollective(Group& g, Collective& c) {
  g.enter(c);
  try {
    Waiter waiter(g, c);
    const size_t chunk = chunkBytes();
    for (;;) {
      bool moved = false;
      bool done = true;
      for (size_t i = 0; i < c.outs.size(); ++i) {
        Leg& l = c.outs[i];
        if (!l.finished()) {
          OutFiller fill(c, i);
          moved |= l.pair->send(chunk, fill) > 0;
        }
        if (!l.finished() || !l.pair->flush()) done = false;
      }
      for (size_t i = 0; i < c.ins.size(); ++i) {
        Leg& l = c.ins[i];
        if (l.finished()) continue;
        InDrainer drain(c, g, i);
        moved |= l.pair->recv(chunk, drain) > 0;
        if (!l.finished()) done = false;
      }
      if (done) break;
      if (moved) waiter.progressed();
      else waiter.idle();
    }
    c.finish();
  } catch (const Error& e) {
    g.fail(c, e);  // marks the mesh broken and rethrows
  }
}

}  // namespace dtrain

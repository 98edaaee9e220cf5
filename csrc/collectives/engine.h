// The progress loop every collective runs on.
//
// A collective is a set of legs: byte streams to (outs) or from (ins) one peer.
// Each stream starts with a 40-byte Descriptor that says what the sender is
// doing, so mismatched calls are caught before any payload is applied, and is
// padded to 8 bytes so the next stream starts aligned. The engine offers each
// unfinished leg a chunk at a time, round-robin, without blocking: the algorithm
// encodes into, and reduces out of, the transport's own memory, and sending,
// receiving and reducing overlap. While nothing moves, it backs off (spin, yield,
// sleep or poll) and every few milliseconds checks the deadline, the host board's
// abort flag and each waited-on peer's liveness.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "transport/transport.h"

namespace dtrain {

class Group;

enum class Kind : uint8_t {
  kAllreduce = 1, kBroadcast, kAllgather, kReduceScatter, kAlltoall, kSend, kBarrier
};
const char* kindName(Kind k);

struct Descriptor {
  uint32_t magic;
  Kind kind;
  DType dtype;
  DType wire;
  RedOp op;
  uint32_t group;
  int32_t root;
  uint64_t seq;
  uint64_t count;  // elements; for variable-size ops, what this leg carries
  uint64_t tag;    // the caller's shape check (shapeTag), 0 when it gave none; must match too
};
static_assert(sizeof(Descriptor) == 40, "the descriptor is 40 bytes on the wire");

// A tensor shape as 64 bits, so ranks that pass the same element count in different shapes
// are caught: up to 4 dims below 2^15 are stored exactly (and named back in errors), others
// hashed (top bit set). Never 0, which means "no shape given".
uint64_t shapeTag(const std::vector<int64_t>& shape);
std::string describeShapeTag(uint64_t tag);

// The tag the calls made on this thread carry while one is alive (the bindings set it around
// a call, on whichever thread runs it).
class CallTag {
 public:
  explicit CallTag(uint64_t tag);
  ~CallTag();
  static uint64_t current();

 private:
  uint64_t prev_;
};
constexpr uint32_t kDescriptorMagic = 0x4c435444;  // "DTCL"

struct Leg {
  Pair* pair = nullptr;
  int peer = 0;         // group rank of the other side
  uint64_t total = 0;   // payload bytes
  uint64_t count = 0;   // elements this leg carries (checked against the peer's descriptor)
  uint64_t done = 0;    // payload bytes moved
  uint32_t hdrDone = 0; // descriptor bytes moved
  uint32_t padDone = 0;
  Descriptor hdr{};     // outs: what we send; ins: what arrived

  uint32_t pad() const { return static_cast<uint32_t>((8 - total % 8) % 8); }
  bool finished() const { return hdrDone == sizeof(Descriptor) && done == total && padDone == pad(); }
};

class Collective {
 public:
  virtual ~Collective() = default;

  std::vector<Leg> outs;
  std::vector<Leg> ins;
  Descriptor desc{};   // this rank's side of the call
  size_t unit = 1;     // wire element size: produce/consume lengths are multiples of it
  bool countMustMatch = true;

  // Payload bytes of outs[i] that may be sent now (the rest waits on ins).
  virtual uint64_t ready(size_t i) { return outs[i].total; }
  // Writes `len` bytes of outs[i]'s payload starting at `pos`; returns bytes written.
  virtual size_t produce(size_t i, uint64_t pos, uint8_t* dst, size_t len) = 0;
  // Applies `len` bytes of ins[i]'s payload starting at `pos`; returns bytes used.
  virtual size_t consume(size_t i, uint64_t pos, const uint8_t* src, size_t len) = 0;
  // Runs after every leg finished (local reductions over what arrived).
  virtual void finish() {}

  // "allreduce #3 of 1000 float32 (4000 bytes)".
  std::string describe() const;

  Leg& addOut(Pair* p, int peer, uint64_t bytes);
  Leg& addIn(Pair* p, int peer, uint64_t bytes);
};

// Runs `c` to completion on the calling thread, or throws (CommError,
// CommTimeout) after marking the group's mesh broken.
void runCollective(Group& g, Collective& c);

std::string describeCall(const Descriptor& d);

}  // namespace dtrain

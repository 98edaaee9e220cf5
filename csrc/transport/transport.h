// The one interface the collective algorithms see: a byte stream to and from
// one peer. shm/, tcp/ and loopback.h implement it; algorithms never see a
// socket or a segment (cf. gloo's transport/pair.h).
//
// Both calls are non-blocking and hand the caller memory in place, so an
// algorithm can encode straight into the channel and reduce straight out of
// it without an intermediate copy. The caller loops (see collectives/engine.h),
// which is what lets sending, receiving and reducing overlap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain {

// Writes at most `cap` bytes to `dst`; returns how many it wrote.
struct Filler {
  virtual size_t operator()(uint8_t* dst, size_t cap) = 0;
};

// Consumes at most `len` bytes from `src`; returns how many it consumed (it may
// leave a partial element for the next call).
struct Drainer {
  virtual size_t operator()(const uint8_t* src, size_t len) = 0;
};

class Pair {
 public:
  virtual ~Pair() = default;

  // Offers up to `max` contiguous writable bytes to `fill`. Returns bytes taken
  // (0 when the channel is full). Bytes taken are on their way: flush() says when
  // they have all left this process.
  virtual size_t send(size_t max, Filler& fill) = 0;

  // Offers up to `max` received bytes to `drain`. Returns bytes consumed.
  virtual size_t recv(size_t max, Drainer& drain) = 0;

  // Pushes staged bytes out. Returns true when nothing is left staged.
  virtual bool flush() { return true; }

  // Throws CommError if the peer is known to be gone. Cheap enough to call
  // every few milliseconds while waiting.
  virtual void checkPeer() = 0;

  // A file descriptor to poll() for readability while idle, or -1 (shared
  // memory has none: waiting there is a spin/yield/sleep backoff).
  virtual int pollFd() const { return -1; }

  // Counters worth printing when a call stalls.
  virtual std::string debugState() const { return ""; }

  // "shm", "tcp" or "loopback", for messages and stats.
  virtual const char* kind() const = 0;

  int peer() const { return peer_; }

 protected:
  explicit Pair(int peer) : peer_(peer) {}
  int peer_;  // global rank of the other side
};

}  // namespace dtrain

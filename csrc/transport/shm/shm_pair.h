// A pair between two ranks on one host: one ring in each direction, each ring
// living in the receiver's segment. Liveness comes from the peer's pid.
#pragma once

#include "transport/ring_channel.h"
#include "transport/transport.h"

namespace dtrain {

class ShmPair : public Pair {
 public:
  ShmPair(int peer, int peerPid, RingChannel out, RingChannel in)
      : Pair(peer), peerPid_(peerPid), out_(out), in_(in) {}

  size_t send(size_t max, Filler& fill) override;
  size_t recv(size_t max, Drainer& drain) override;
  void checkPeer() override;
  const char* kind() const override { return "shm"; }
  std::string debugState() const override { return "out{" + out_.debugState() + "} in{" + in_.debugState() + "}"; }

 private:
  int peerPid_;
  size_t unreadAfterDeath_ = 0;  // checkPeer: bytes left to read when the peer was last found dead
  RingChannel out_;
  RingChannel in_;
};

}  // namespace dtrain

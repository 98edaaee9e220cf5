#include "transport/shm/shm_pair.h"

#include "common/error.h"
#include "transport/shm/board.h"

namespace dtrain {

size_t ShmPair::send(size_t max, Filler& fill) {
  uint8_t* dst;
  size_t n = out_.writable(&dst);
  if (n == 0) return 0;
  n = fill(dst, n < max ? n : max);
  out_.commit(n);
  return n;
}

size_t ShmPair::recv(size_t max, Drainer& drain) {
  const uint8_t* src;
  size_t n = in_.readable(&src);
  if (n == 0) return 0;
  n = drain(src, n < max ? n : max);
  in_.consume(n);
  return n;
}

void ShmPair::checkPeer() {
  if (processAlive(peerPid_)) return;
  // A peer may write its last bytes and exit before this rank reads them; the ring lives in
  // this rank's segment, so they are still here. Not a failure while what is left to read
  // keeps changing between checks (the progress loop drains it in between); once it stops
  // changing, or nothing is left, the call cannot finish.
  const uint8_t* src;
  size_t unread = in_.readable(&src);
  if (unread > 0 && unread != unreadAfterDeath_) {
    unreadAfterDeath_ = unread;
    return;
  }
  DTRAIN_THROW(kComm, "rank ", peer_, " (pid ", peerPid_, " on this host) has died",
               unread > 0 ? " (leaving " + std::to_string(unread) + " bytes this rank could not use)" : "");
}

}  // namespace dtrain

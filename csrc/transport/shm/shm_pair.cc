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
  DTRAIN_CHECK(processAlive(peerPid_), kComm, "rank ", peer_, " (pid ", peerPid_,
               " on this host) has died");
}

}  // namespace dtrain

#include "transport/tcp/tcp_pair.h"

#include <sys/socket.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace dtrain {

TcpPair::TcpPair(int peer, Socket sock, size_t bufferBytes)
    : Pair(peer), sock_(std::move(sock)), sbuf_(bufferBytes), rbuf_(bufferBytes) {
  sock_.setNoDelay();
  sock_.setBuffers(static_cast<int>(bufferBytes * 4));
  sock_.setNonBlocking(true);
}

bool TcpPair::flush() {
  while (sHead_ < sTail_) {
    ssize_t k = ::send(sock_.fd(), sbuf_.data() + sHead_, sTail_ - sHead_, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      sHead_ += static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return false;
    closed_ = true;
    DTRAIN_THROW(kComm, "connection to rank ", peer_, " lost while sending: ", std::strerror(errno),
                 " (it died or aborted)");
  }
  sHead_ = sTail_ = 0;
  return true;
}

size_t TcpPair::send(size_t max, Filler& fill) {
  flush();
  size_t space = sbuf_.size() - sTail_;
  if (space == 0) return 0;
  size_t n = fill(sbuf_.data() + sTail_, space < max ? space : max);
  sTail_ += n;
  flush();
  return n;
}

void TcpPair::readMore() {
  if (rHead_ == rTail_) rHead_ = rTail_ = 0;
  if (rTail_ == rbuf_.size() && rHead_ > 0) {  // keep a partial element, make room behind it
    std::memmove(rbuf_.data(), rbuf_.data() + rHead_, rTail_ - rHead_);
    rTail_ -= rHead_;
    rHead_ = 0;
  }
  if (rTail_ == rbuf_.size()) return;
  ssize_t k = ::recv(sock_.fd(), rbuf_.data() + rTail_, rbuf_.size() - rTail_, MSG_DONTWAIT);
  if (k > 0) {
    rTail_ += static_cast<size_t>(k);
    return;
  }
  if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  closed_ = true;
  DTRAIN_THROW(kComm, "connection to rank ", peer_, " closed",
               k == 0 ? "" : std::string(": ") + std::strerror(errno),
               " (rank ", peer_, " died or aborted)");
}

size_t TcpPair::recv(size_t max, Drainer& drain) {
  if (rTail_ - rHead_ < max) readMore();
  size_t avail = rTail_ - rHead_;
  if (avail == 0) return 0;
  size_t n = drain(rbuf_.data() + rHead_, avail < max ? avail : max);
  rHead_ += n;
  return n;
}

void TcpPair::checkPeer() {
  DTRAIN_CHECK(!closed_, kComm, "connection to rank ", peer_, " is closed (it died or aborted)");
}

void TcpPair::shutdown() {
  if (sock_.valid()) ::shutdown(sock_.fd(), SHUT_RDWR);
}

}  // namespace dtrain

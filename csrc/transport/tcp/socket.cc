#include "transport/tcp/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "common/error.h"
#include "common/hmac.h"

namespace dtrain {
namespace {

int pollFor(int fd, short events, Deadline d) {
  for (;;) {
    double left = secondsLeft(d);
    if (left <= 0) return 0;
    pollfd p{fd, events, 0};
    int ms = left > 0.2 ? 200 : static_cast<int>(left * 1000) + 1;
    int r = ::poll(&p, 1, ms);
    if (r > 0) return r;
    if (r < 0 && errno != EINTR) return -1;
  }
}

addrinfo* resolve(const std::string& host, int port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_INET;  // IPv4 keeps address handling simple; hosts name an IPv4 interface
  hints.ai_socktype = SOCK_STREAM;
  if (passive) hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  std::string p = std::to_string(port);
  int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), p.c_str(), &hints, &res);
  DTRAIN_CHECK(rc == 0 && res, kRendezvous, "cannot resolve host '", host, "': ", gai_strerror(rc),
               "; check DTRAIN_MASTER_ADDR / MASTER_ADDR");
  return res;
}

}  // namespace

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void Socket::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Socket Socket::listen(const std::string& host, int port, int backlog) {
  addrinfo* res = resolve(host, port, true);
  int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, res->ai_addr, res->ai_addrlen) != 0) {
    int e = errno;
    ::freeaddrinfo(res);
    ::close(fd);
    DTRAIN_THROW(kRendezvous, "cannot listen on ", host.empty() ? "*" : host, ":", port, ": ",
                 std::strerror(e),
                 e == EADDRINUSE ? " (another job holds the port: pick another MASTER_PORT, or let "
                                   "dtrain-run choose one)"
                                 : "");
  }
  ::freeaddrinfo(res);
  DTRAIN_CHECK(::listen(fd, backlog) == 0, kRendezvous, "listen() failed: ", std::strerror(errno));
  return Socket(fd);
}

Socket Socket::connect(const std::string& host, int port, Deadline deadline, const std::string& what) {
  int lastErr = 0;
  auto pause = std::chrono::milliseconds(5);
  while (Clock::now() < deadline) {
    addrinfo* res = resolve(host, port, false);
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    int rc = ::connect(fd, res->ai_addr, res->ai_addrlen);
    ::freeaddrinfo(res);
    if (rc != 0 && errno == EINPROGRESS) {
      if (pollFor(fd, POLLOUT, deadline) > 0) {
        socklen_t len = sizeof(lastErr);
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &lastErr, &len);
        rc = lastErr == 0 ? 0 : -1;
      } else {
        lastErr = ETIMEDOUT;
      }
    } else if (rc != 0) {
      lastErr = errno;
    }
    if (rc == 0) {
      Socket s(fd);
      s.setNonBlocking(false);
      return s;
    }
    ::close(fd);
    std::this_thread::sleep_for(pause);
    if (pause < std::chrono::milliseconds(200)) pause *= 2;
  }
  DTRAIN_THROW(kTimeout, "could not connect to ", what, " at ", host, ":", port, ": ",
               std::strerror(lastErr ? lastErr : ETIMEDOUT),
               "; check that the address is reachable from this host and the process there is up");
}

Socket Socket::accept(Deadline deadline, std::string* peer) const {
  if (pollFor(fd_, POLLIN, deadline) <= 0) return Socket();
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  int fd = ::accept4(fd_, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
  if (fd < 0) return Socket();
  if (peer) {
    char buf[INET_ADDRSTRLEN] = {0};
    ::inet_ntop(AF_INET, &addr.sin_addr, buf, sizeof(buf));
    *peer = std::string(buf) + ":" + std::to_string(ntohs(addr.sin_port));
  }
  return Socket(fd);
}

void Socket::sendAll(const void* buf, size_t n, Deadline deadline, const char* what) const {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    ssize_t k = ::send(fd_, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
      int r = pollFor(fd_, POLLOUT, deadline);
      DTRAIN_CHECK(r != 0, kTimeout, "timed out sending to ", what);
      continue;
    }
    DTRAIN_THROW(kComm, "connection to ", what, " lost while sending: ", std::strerror(errno));
  }
}

void Socket::recvAll(void* buf, size_t n, Deadline deadline, const char* what) const {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    ssize_t k = ::recv(fd_, p, n, MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k == 0) DTRAIN_THROW(kComm, "connection to ", what, " closed by the other side");
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
      int r = pollFor(fd_, POLLIN, deadline);
      DTRAIN_CHECK(r != 0, kTimeout, "timed out waiting for ", what);
      continue;
    }
    DTRAIN_THROW(kComm, "connection to ", what, " lost while receiving: ", std::strerror(errno));
  }
}

void Socket::setNoDelay() {
  int one = 1;
  ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

void Socket::setNonBlocking(bool on) {
  int flags = ::fcntl(fd_, F_GETFL, 0);
  ::fcntl(fd_, F_SETFL, on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK));
}

void Socket::setBuffers(int bytes) {
  ::setsockopt(fd_, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes));
  ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes));
}

int Socket::localPort() const {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.sin_port);
}

std::string Socket::localAddress() const {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  char buf[INET_ADDRSTRLEN] = {0};
  ::inet_ntop(AF_INET, &addr.sin_addr, buf, sizeof(buf));
  return buf;
}

// ---- handshake ----
//
//   server -> client : "DTRN" u32 version, nonce_s[32]
//   client -> server : nonce_c[32], HMAC(token, role|"client"|nonce_s|nonce_c)
//   server -> client : HMAC(token, role|"server"|nonce_c|nonce_s)       (only if the client proved it)

namespace {

constexpr uint32_t kHandshakeVersion = 1;

Digest proof(const std::string& token, const char* role, const char* side, const uint8_t* a,
             const uint8_t* b) {
  std::string msg = std::string(role) + "|" + side + "|";
  msg.append(reinterpret_cast<const char*>(a), 32);
  msg.append(reinterpret_cast<const char*>(b), 32);
  return hmacSha256(token, msg.data(), msg.size());
}

}  // namespace

void authenticateAsClient(const Socket& s, const std::string& token, const char* role, Deadline d) {
  uint8_t hello[40];
  s.recvAll(hello, sizeof(hello), d, "handshake (server hello)");
  uint32_t version;
  std::memcpy(&version, hello + 4, 4);
  DTRAIN_CHECK(std::memcmp(hello, "DTRN", 4) == 0, kRendezvous,
               "the peer is not a dtrain endpoint (bad handshake magic): check the address and port");
  DTRAIN_CHECK(version == kHandshakeVersion, kRendezvous, "handshake version mismatch: peer speaks v",
               version, ", this process v", kHandshakeVersion, "; run the same dtrain on every host");
  const uint8_t* nonceS = hello + 8;
  uint8_t reply[64];
  randomBytes(reply, 32);
  Digest mine = proof(token, role, "client", nonceS, reply);
  std::memcpy(reply + 32, mine.data(), 32);
  s.sendAll(reply, sizeof(reply), d, "handshake (client proof)");
  uint8_t theirs[32];
  try {
    s.recvAll(theirs, sizeof(theirs), d, "handshake (server proof)");
  } catch (const Error&) {
    DTRAIN_THROW(kRendezvous, "the peer refused this process's job token (", role,
                 " connection): every rank must get the same DTRAIN_JOB_TOKEN");
  }
  Digest expect = proof(token, role, "server", reply, nonceS);
  DTRAIN_CHECK(digestEqual(expect.data(), theirs, 32), kRendezvous,
               "the peer could not prove the job token (", role,
               " connection): another job may be using this address; check MASTER_ADDR/PORT");
}

bool authenticateAsServer(const Socket& s, const std::string& token, const char* role, Deadline d,
                          std::string* why) {
  try {
    uint8_t hello[40];
    std::memcpy(hello, "DTRN", 4);
    std::memcpy(hello + 4, &kHandshakeVersion, 4);
    randomBytes(hello + 8, 32);
    s.sendAll(hello, sizeof(hello), d, "handshake (server hello)");
    uint8_t reply[64];
    s.recvAll(reply, sizeof(reply), d, "handshake (client proof)");
    Digest expect = proof(token, role, "client", hello + 8, reply);
    if (!digestEqual(expect.data(), reply + 32, 32)) {
      *why = "wrong job token";
      return false;
    }
    Digest mine = proof(token, role, "server", reply, hello + 8);
    s.sendAll(mine.data(), 32, d, "handshake (server proof)");
    return true;
  } catch (const Error& e) {
    *why = e.what();
    return false;
  }
}

}  // namespace dtrain

// Blocking-with-deadline socket helpers and the job-token handshake shared by
// the rendezvous store and the TCP data pairs.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

inline Deadline deadlineIn(double seconds) {
  return Clock::now() + std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
}
inline double secondsLeft(Deadline d) {
  return std::chrono::duration<double>(d - Clock::now()).count();
}

class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  ~Socket() { close(); }

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void close();
  int release() { int f = fd_; fd_ = -1; return f; }

  // Listening socket on `host` (empty: all interfaces) and `port` (0: any free port).
  static Socket listen(const std::string& host, int port, int backlog = 128);
  // Connects, retrying refused connections until the deadline (the listener may not be up yet).
  static Socket connect(const std::string& host, int port, Deadline deadline, const std::string& what);
  // Accepts one connection; returns an invalid socket at the deadline.
  Socket accept(Deadline deadline, std::string* peer = nullptr) const;

  // Throw CommError (naming `what`) on EOF or error, CommTimeout at the deadline.
  void sendAll(const void* buf, size_t n, Deadline deadline, const char* what) const;
  void recvAll(void* buf, size_t n, Deadline deadline, const char* what) const;

  void setNoDelay();
  void setNonBlocking(bool on);
  void setBuffers(int bytes);
  int localPort() const;
  std::string localAddress() const;  // address this socket is bound to (numeric)

 private:
  int fd_ = -1;
};

// Mutual HMAC-SHA256 challenge over `token`. The server speaks first, so a
// client that cannot prove the token never gets anything it could use.
// `role` separates uses ("store", "data") so a reply from one cannot be replayed
// into the other. Client: throws RendezvousError on failure.
void authenticateAsClient(const Socket& s, const std::string& token, const char* role, Deadline d);
// Server: returns false (with `why`) if the peer failed to prove the token.
bool authenticateAsServer(const Socket& s, const std::string& token, const char* role, Deadline d,
                          std::string* why);

}  // namespace dtrain

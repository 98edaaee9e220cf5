// A pair over one TCP connection. Bytes are staged in user-space buffers so
// the algorithms can encode into and reduce out of them like any other pair.
#pragma once

#include <vector>

#include "transport/tcp/socket.h"
#include "transport/transport.h"

namespace dtrain {

class TcpPair : public Pair {
 public:
  TcpPair(int peer, Socket sock, size_t bufferBytes);

  size_t send(size_t max, Filler& fill) override;
  size_t recv(size_t max, Drainer& drain) override;
  bool flush() override;
  void checkPeer() override;
  int pollFd() const override { return sock_.fd(); }
  const char* kind() const override { return "tcp"; }

  // Shuts the connection down so the peer learns at once that we are gone.
  void shutdown();

 private:
  void readMore();

  Socket sock_;
  std::vector<uint8_t> sbuf_;
  size_t sHead_ = 0, sTail_ = 0;  // staged bytes are [sHead_, sTail_)
  std::vector<uint8_t> rbuf_;
  size_t rHead_ = 0, rTail_ = 0;  // received, unconsumed bytes are [rHead_, rTail_)
  bool closed_ = false;
};

}  // namespace dtrain

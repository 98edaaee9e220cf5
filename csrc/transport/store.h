// The rendezvous store: a small key/value server that rank 0 runs on a TCP
// port, and the client every rank (rank 0 included) uses to reach it. Ranks
// publish their addresses and shared-memory segment names here at start-up.
// Every connection must pass the job-token handshake before any request is read.
#pragma once

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transport/tcp/socket.h"

namespace dtrain {

class StoreServer {
 public:
  // Serves on `listener` (already bound; the launcher may have handed it over).
  StoreServer(Socket listener, std::string token);
  ~StoreServer();
  StoreServer(const StoreServer&) = delete;
  StoreServer& operator=(const StoreServer&) = delete;

  int port() const { return port_; }
  int refused() const { return refused_.load(); }

 private:
  void acceptLoop();
  void serve(int fd, std::string peer);

  Socket listener_;
  std::string token_;
  int port_;
  std::atomic<bool> stop_{false};
  std::atomic<int> refused_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> kv_;
  std::vector<int> clients_;  // fds, shut down on stop so their threads exit
  std::vector<std::thread> threads_;
  std::thread acceptor_;
};

class StoreClient {
 public:
  StoreClient(const std::string& host, int port, std::string token, double timeout);

  // `timeout` < 0: the client's own. A short one suits a job that is already failing.
  void set(const std::string& key, const std::string& value, double timeout = -1);
  // Waits until `key` exists (up to `timeout` seconds) and returns its value.
  std::string get(const std::string& key, double timeout);
  int64_t add(const std::string& key, int64_t delta, double timeout = -1);
  // Waits until `n` callers have reached the barrier called `name`.
  void barrier(const std::string& name, int n, double timeout);

  // The address of this host's interface that reaches the store: what peers use to reach us.
  std::string localAddress() const { return sock_.localAddress(); }

 private:
  std::string request(uint8_t op, const std::string& key, const std::string& value, double timeout);

  Socket sock_;
  std::string token_;
  double timeout_;
  std::string where_;
  std::mutex mu_;
};

}  // namespace dtrain

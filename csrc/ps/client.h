// A worker's connections to every parameter server. One exchange pushes this
// step's flat gradient (each server gets its contiguous slice, optionally as
// fp16/bf16) and brings back each server's fresh parameters, on a C++ thread so the
// caller can go on (the next batch's loading) until it needs the parameters.
#pragma once

#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "common/dtype.h"
#include "common/error.h"
#include "ps/protocol.h"
#include "transport/tcp/socket.h"

namespace dtrain {
namespace ps {

struct ClientOptions {
  std::string token;
  int worker = 0;                  // index among the workers
  int rank = 0;                    // global rank (messages)
  std::vector<std::string> hosts;  // per server
  std::vector<int> ports;
  std::vector<int> serverRanks;
  std::vector<uint64_t> bounds;    // server s holds flat elements [bounds[s], bounds[s+1])
  uint64_t layoutHash = 0;
  int numGroups = 1;
  double timeout = 300.0;
};

struct Exchange {
  uint64_t step = 0;      // this worker's pushes so far
  uint64_t lead = 0;      // how far ahead of the slowest live worker it was answered (max over servers)
  uint64_t slowest = 0;   // the slowest live worker's step (min over servers)
  uint64_t applied = 0;   // updates applied on server 0
  double seconds = 0;     // push to last reply
};

class Client {
 public:
  explicit Client(const ClientOptions& o);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  uint64_t step() const { return step_; }
  bool busy() const { return worker_.joinable(); }

  // Starts pushing `grad` (flat float32, every element) and receiving into `params`;
  // both must stay alive and untouched until wait() returns.
  void start(const float* grad, float* params, const std::vector<double>& lrs, DType wire);
  Exchange wait();
  void pull(float* params);
  // Save/load on every server; returns each server's message, throws naming the first that failed.
  std::vector<std::string> control(uint32_t kind, uint64_t step, const std::string& path);
  std::vector<std::string> stats();
  void done();

 private:
  struct Link {
    Socket sock;
    std::string where;  // "parameter server rank R (host:port)"
    uint64_t begin = 0, count = 0;
    std::vector<uint8_t> wire;
  };
  void exchange(const float* grad, float* params, std::vector<double> lrs, DType wire);
  Header expectReply(Link& l, Msg type, const char* doing);
  std::string readText(Link& l, const Header& h);
  [[noreturn]] void lost(Link& l, const char* doing, const Error& e);

  ClientOptions opts_;
  std::vector<Link> links_;
  uint64_t step_ = 0;
  std::thread worker_;
  std::exception_ptr error_;
  Exchange result_;
  bool finished_ = false;
};

}  // namespace ps
}  // namespace dtrain

// One parameter server: holds a contiguous shard of the model's flat float32
// parameters and their optimizer state, and applies workers' pushed gradients with
// the fused CPU kernels on its own C++ threads (one per worker connection; none
// ever takes the GIL).
//
// Clocks: a worker's clock counts its pushes. With staleness s >= 0 a worker's push
// is answered (its fresh parameters sent) only once it is at most s pushes ahead of
// the slowest live worker; s = 0 additionally averages every live worker's gradient
// for a step and applies it once (synchronous training). s < 0 is fully asynchronous:
// each push is applied as its own step and answered at once. A worker whose
// connection drops without Done stops counting for the clock; one that reconnects
// rejoins at the slowest live worker's clock.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/optim_math.h"
#include "ps/protocol.h"
#include "transport/tcp/socket.h"

namespace dtrain {
namespace ps {

// One parameter group's slice of this shard, and its hyper-parameters (torch's names).
struct GroupSlice {
  uint64_t begin = 0, end = 0;  // in shard elements
  int group = 0;                // index among the optimizer's parameter groups
  double lr = 0, weightDecay = 0;
  // SGD
  double momentum = 0, dampening = 0;
  bool nesterov = false;
  // Adam / AdamW
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool maximize = false;
  // progress (saved with the shard)
  int64_t step = 0;            // Adam's bias-correction step
  bool momentumStarted = false;
};

struct ServerOptions {
  std::string token;
  std::string optimizer;  // "sgd", "adam" or "adamw"
  int numWorkers = 1;
  int numGroups = 1;        // the optimizer's parameter groups (each push carries their learning rates)
  int firstWorkerRank = 1;  // global rank of worker 0 (for messages)
  int rank = 0;             // this server's global rank
  int staleness = -1;       // < 0: fully asynchronous
  double timeout = 300.0;   // longest wait for a slow worker before answering with an error
  uint64_t layoutHash = 0;  // workers must present the same
  std::string bindHost;     // "" = every interface
};

struct ControlRequest {
  uint64_t id = 0;
  uint32_t kind = 0;
  uint64_t step = 0;
  std::string path;
  int worker = -1;
  bool finished = false;
  bool ok = false;
  std::string message;
};

class Server {
 public:
  // `params` (shardCount float32) is copied in.
  Server(const ServerOptions& o, std::vector<GroupSlice> groups, const float* params, uint64_t shardCount);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  int port() const { return port_; }
  uint64_t shardCount() const { return n_; }

  // For the Python thread that owns this server: waits up to `seconds` for a control
  // request (save/load) from a worker or for the end of training. Returns the request,
  // or one with id 0 when none came; `*finished` is set once every worker is done or gone.
  ControlRequest nextControl(double seconds, bool* finished);
  void completeControl(uint64_t id, bool ok, const std::string& message);

  // Consistent copies of the shard (params, then each state buffer) and group progress.
  std::vector<GroupSlice> snapshot(float* params, float* state1, float* state2);
  void restore(const float* params, const float* state1, const float* state2, const std::vector<GroupSlice>& groups);
  int stateBuffers() const;  // how many state buffers this optimizer keeps (0, 1 or 2)

  std::string statsJson();
  void stop();

 private:
  struct Worker {
    uint64_t clock = 0;
    bool connected = false, done = false, lost = false;
    uint64_t pushes = 0, bytes = 0, rejoins = 0;
  };
  struct Conn;

  void acceptLoop();
  void serve(std::shared_ptr<Conn> c);
  bool handle(Conn& c, const Header& h);  // false: close the connection
  void reject(Conn& c, const std::string& why);
  void sendError(Conn& c, const std::string& why);
  void sendParams(Conn& c, uint64_t lead, uint64_t slowest, uint64_t applied);
  void sendReply(Conn& c, bool ok, const std::string& text);

  // Under mu_:
  bool live(int w) const { return !workers_[w].done && !workers_[w].lost; }
  uint64_t slowestLive() const;  // UINT64_MAX when nobody is live
  void applyLocked(const float* grad, float gradScale, const double* lrs);
  void maybeApplySyncLocked();
  void dropWorkerLocked(int w, const std::string& why);
  std::string laggardsLocked(uint64_t below) const;

  ServerOptions opts_;
  std::vector<GroupSlice> groups_;
  uint64_t n_;
  std::vector<float> params_, state1_, state2_, acc_;
  std::vector<double> pendingLrs_;
  uint64_t accContributors_ = 0;
  uint64_t applied_ = 0;

  Socket listener_;
  int port_ = 0;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;
  std::condition_variable cv_;  // clocks, applied_, workers_
  std::vector<Worker> workers_;

  std::mutex connMu_;
  std::vector<std::shared_ptr<Conn>> conns_;
  std::vector<std::thread> threads_;

  std::mutex controlMu_;
  std::condition_variable controlCv_;
  std::deque<std::shared_ptr<ControlRequest>> controlQueue_;
  std::map<uint64_t, std::shared_ptr<ControlRequest>> controlPending_;
  uint64_t nextControlId_ = 1;

  // stats (under mu_)
  std::vector<uint64_t> leadHistogram_;  // leads 0..63, the last bucket counts 63 and more
  uint64_t maxLead_ = 0;
  double applySeconds_ = 0;
  uint64_t appliedBytes_ = 0;
  uint64_t pushBytes_ = 0, pushes_ = 0, rejected_ = 0;
  Clock::time_point firstPush_{}, lastPush_{};
};

}  // namespace ps
}  // namespace dtrain

// The world's connections: found through the rendezvous store, one pair per
// peer (shared memory when the peer is on this host, TCP otherwise), plus the
// host board. Groups borrow pairs from here; nothing else opens connections.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/shm/board.h"
#include "transport/shm/segment.h"
#include "transport/store.h"
#include "transport/transport.h"

namespace dtrain {

struct MeshOptions {
  int rank = 0;
  int size = 1;
  std::string masterAddr = "127.0.0.1";
  int masterPort = 0;
  std::string token;
  double timeout = 300.0;
  int storeFd = -1;               // rank 0: listening socket inherited from the launcher
  std::string transport = "auto"; // auto | shm | tcp   (tcp: no shared memory even on one host)
  std::string hostId;             // ranks with the same host id share memory; empty: detect
  size_t shmBytes = 4u << 20;     // ring size per direction between two local ranks
  size_t tcpBytes = 4u << 20;     // staging buffer per TCP pair and direction
};

class Mesh {
 public:
  explicit Mesh(const MeshOptions& o);
  // A mesh over ready-made pairs (the loopback fake in unit tests): no store, no board.
  // `hosts[r]` (optional) is hostOf(r), for testing layouts of several ranks per host.
  Mesh(int rank, int size, std::vector<std::unique_ptr<Pair>> pairs, std::vector<int> hosts = {});
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int rank() const { return opts_.rank; }
  int size() const { return opts_.size; }
  int localRank() const { return localRank_; }
  int localSize() const { return static_cast<int>(localRanks_.size()); }
  bool isLocal(int r) const { return r == opts_.rank || local_[r]; }
  // The lowest rank sharing memory with `r`: equal values mean one host (same on every rank).
  int hostOf(int r) const { return host_[r]; }
  Pair* pair(int r) const { return pairs_[r].get(); }
  Board& board() { return board_; }
  StoreClient* store() const { return store_.get(); }
  int refusedConnections() const;
  uint64_t spinLimit() const { return spinLimit_; }
  // Ranks of this job on this machine's cores (several network namespaces count as one machine).
  int machineRanks() const { return machineRanks_; }
  static int cores();
  const std::string& hostId() const { return hostId_; }

  // First failure wins; later calls keep the first reason. The job's first failure is also
  // posted to the rendezvous store, so ranks on other hosts, which only see a connection
  // close, can say what went wrong where it started.
  void breakWith(const std::string& reason);
  // True once broken; *why is the reason, followed by where the job failed first when
  // another rank reported it.
  bool broken(std::string* why) const;
  // What another rank reported as the job's first failure ("" when it was this rank's, or unknown).
  std::string earlierFailure() const;

 private:
  void connectTcp(const std::vector<std::string>& addrs, const std::vector<int>& ports,
                  Socket& listener);
  void connectShm(const std::string& prefix, const std::vector<int>& pids);

  MeshOptions opts_;
  std::string hostId_;
  std::unique_ptr<StoreServer> server_;
  std::unique_ptr<StoreClient> store_;
  std::vector<std::unique_ptr<Pair>> pairs_;
  std::vector<bool> local_;
  std::vector<int> host_;
  std::vector<int> localRanks_;
  int localRank_ = 0;
  Board board_;
  Segment inbound_;                 // my receive rings, one per local peer
  std::vector<Segment> outbound_;   // peers' segments I write into
  uint64_t spinLimit_ = 20000;
  int machineRanks_ = 1;
  mutable std::mutex mu_;
  std::string broken_;
  mutable std::mutex reportMu_;  // guards earlier_; taken inside mu_, never the other way
  std::string earlier_;
};

}  // namespace dtrain

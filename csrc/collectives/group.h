// A communicator over a subset of the world's ranks (the world itself is a
// group of every rank). Each call blocks the calling thread until done; the
// Executor (progress.h) is what runs them off the Python thread.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "collectives/engine.h"
#include "common/dtype.h"
#include "common/error.h"
#include "transport/mesh.h"

namespace dtrain {

// How an allreduce crosses hosts. kAuto and kHierarchical: hierarchically (reduce-scatter within
// each host, allreduce across hosts, allgather within) where the layout allows it, which has
// been faster at every size measured (kAuto may come to weigh size and links; kHierarchical
// will not); kFlat: one ring (or the one-hop path) over every member.
// DTRAIN_HIERARCHICAL=auto|0|1 sets the default.
enum class Hierarchy { kAuto, kFlat, kHierarchical };

class Group {
 public:
  // `ranks`: global ranks, in group-rank order. `id` must be the same on every member.
  Group(Mesh* mesh, std::vector<int> ranks, uint32_t id, std::string name, double timeout);

  int rank() const { return me_; }  // -1 when this process is not a member
  int size() const { return static_cast<int>(ranks_.size()); }
  int globalRank(int groupRank) const { return ranks_[groupRank]; }
  const std::vector<int>& ranks() const { return ranks_; }
  const std::string& name() const { return name_; }
  uint32_t id() const { return id_; }
  double timeout() const { return timeout_; }
  void setTimeout(double t);
  // Allreduces of at most this many wire bytes take the one-hop direct path.
  uint64_t smallBytes() const { return smallBytes_; }
  void setSmallBytes(uint64_t b);
  bool compressesWire() const { return compressWire_; }
  void setCompressWire(bool on);
  Hierarchy hierarchy() const { return hierarchy_; }
  void setHierarchy(Hierarchy h) { hierarchy_ = h; }
  // True when the members sit on two or more hosts with the same number (two or more) on each:
  // the layout a hierarchical allreduce needs.
  bool hierarchicalLayout() const { return local_ != nullptr; }
  // Whether an allreduce of `count` elements takes the hierarchical path.
  bool takesHierarchy(uint64_t count) const;
  Mesh& mesh() { return *mesh_; }

  // In place on `buf`. `wire` != dtype sends fp16/bf16 and accumulates in float32.
  void allreduce(void* buf, uint64_t count, DType dt, RedOp op, DType wire);
  void broadcast(void* buf, uint64_t count, DType dt, int root);
  // Rank i contributes counts[i] elements; `out` receives all, in rank order.
  void allgather(const void* in, void* out, const std::vector<uint64_t>& counts, DType dt);
  // `in` holds size()*count elements; `out` receives this rank's reduced block of `count`.
  void reduceScatter(const void* in, void* out, uint64_t count, DType dt, RedOp op, DType wire);
  // Block i of `in` (sendCounts[i] elements) goes to rank i; block i of `out` comes from rank i.
  void alltoall(const void* in, const std::vector<uint64_t>& sendCounts, void* out,
                const std::vector<uint64_t>& recvCounts, DType dt);
  void send(const void* buf, uint64_t count, DType dt, int dst);
  void recv(void* buf, uint64_t count, DType dt, int src);
  // Sends `sendCount` elements to `dst` while receiving `recvCount` from `src`, as one call that
  // ends when both legs have: the two neighbours of a pipeline trade activations for gradients
  // without either send waiting on the other's. dst or src of -1 leaves that leg out.
  void sendRecv(const void* sendBuf, uint64_t sendCount, int dst, void* recvBuf, uint64_t recvCount, int src,
                DType dt);
  void barrier();

  // The call number each member last entered in this group, in group-rank order; -1 where this
  // host cannot see it (a remote rank, or no shared board). A stall inspector compares them
  // with this rank's own entry to name who has not arrived.
  std::vector<int64_t> entered() const;

  // ---- used by the engine ----
  Pair* pair(int groupRank) const { return mesh_->pair(ranks_[groupRank]); }
  uint64_t spinLimit() const { return spinLimit_ ? spinLimit_ : mesh_->spinLimit(); }
  void enter(Collective& c);
  void checkHealth(Collective& c, double idleSeconds);
  [[noreturn]] void fail(Collective& c, const Error& e);
  std::vector<uint8_t>& scratch(size_t bytes);

 private:
  Descriptor begin(Kind kind, DType dt, uint64_t count, RedOp op = RedOp::kSum, DType wire = DType::kFloat32,
                   int root = 0, bool collective = true);
  void requireMember(const char* what) const;
  void buildHierarchy();
  uint32_t subgroupId(uint32_t tag) const;
  void hierarchicalAllreduce(uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire);

  Mesh* mesh_;
  std::vector<int> ranks_;
  int me_ = -1;
  uint32_t id_;
  int gslot_;
  std::string name_;
  double timeout_;
  uint64_t seq_ = 0;
  uint64_t smallBytes_;
  // Half-precision wire pays only where a link, not memory, is the bottleneck:
  // false when every member shares this host's memory (DTRAIN_SHM_COMPRESSION=1 forces true).
  bool compressWire_ = true;
  std::vector<uint8_t> scratch_;
  Hierarchy hierarchy_ = Hierarchy::kAuto;
  uint64_t spinLimit_ = 0;  // 0: the mesh's
  // The hierarchical path's sub-groups: this rank's host, and the ranks with this rank's local
  // index on every host. Null unless hierarchicalLayout().
  std::unique_ptr<Group> local_, cross_;
};

}  // namespace dtrain

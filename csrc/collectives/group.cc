#include "collectives/group.h"

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "collectives/algorithms.h"
#include "collectives/reduce_kernels.h"

namespace dtrain {
namespace {

uint64_t defaultSmallBytes() {
  static uint64_t v = [] {
    const char* s = std::getenv("DTRAIN_SMALL_BYTES");
    return s ? std::strtoull(s, nullptr, 10) : uint64_t(64) << 10;
  }();
  return v;
}

Hierarchy defaultHierarchy() {
  const char* s = std::getenv("DTRAIN_HIERARCHICAL");
  if (!s || !*s || std::strcmp(s, "auto") == 0) return Hierarchy::kAuto;
  if (std::strcmp(s, "0") == 0) return Hierarchy::kFlat;
  if (std::strcmp(s, "1") == 0) return Hierarchy::kHierarchical;
  DTRAIN_THROW(kConfig, "DTRAIN_HIERARCHICAL=", s, " is not one of auto, 0 (always one flat ring) or 1 "
               "(hierarchical wherever each host holds the same number of ranks)");
}

// The hierarchical allreduce works through the buffer in chunks of about this many bytes (2 MiB
// measured best on the test bed, beside 1 and 4), so
// that one chunk crosses the hosts while the next is reduced within them.
uint64_t hierarchyChunkBytes() {
  static uint64_t v = [] {
    const char* s = std::getenv("DTRAIN_HIERARCHY_CHUNK_BYTES");
    uint64_t b = s ? std::strtoull(s, nullptr, 10) : 0;
    return b ? b : uint64_t(2) << 20;
  }();
  return v;
}

}  // namespace

Group::Group(Mesh* mesh, std::vector<int> ranks, uint32_t id, std::string name, double timeout)
    : mesh_(mesh), ranks_(std::move(ranks)), id_(id), gslot_(static_cast<int>(id % kGroupSlots)),
      name_(std::move(name)), timeout_(timeout), smallBytes_(defaultSmallBytes()) {
  DTRAIN_CHECK(!ranks_.empty(), kConfig, "a group needs at least one rank");
  std::set<int> seen;
  for (size_t i = 0; i < ranks_.size(); ++i) {
    int r = ranks_[i];
    DTRAIN_CHECK(r >= 0 && r < mesh->size(), kConfig, "group rank list names rank ", r,
                 ", outside the world of ", mesh->size(), " ranks");
    DTRAIN_CHECK(seen.insert(r).second, kConfig, "group rank list names rank ", r, " twice");
    if (r == mesh->rank()) me_ = static_cast<int>(i);
  }
  // Every member sees the same answer: "all members are on my host" holds on
  // one member exactly when it holds on all of them.
  bool allShm = true;
  for (int r : ranks_) allShm = allShm && mesh->isLocal(r);
  const char* force = std::getenv("DTRAIN_SHM_COMPRESSION");
  compressWire_ = !allShm || (force && std::strcmp(force, "0") != 0 && *force);
  hierarchy_ = defaultHierarchy();
  buildHierarchy();
}

uint32_t Group::subgroupId(uint32_t tag) const {
  // User groups have the top bit clear (comm/group.py); sub-groups set it. Board slot 0 is the world's.
  uint32_t v = ((id_ * 2654435761u) ^ (tag * 0x85EBCA6Bu) ^ (tag >> 7)) | 0x80000000u;
  return v % kGroupSlots == 0 ? v ^ 1u : v;
}

void Group::buildHierarchy() {
  if (me_ < 0) return;
  // Hosts in the order of their first member; each host's members in group-rank order.
  std::vector<int> hosts;
  std::vector<std::vector<int>> members;
  int myHost = 0, myIndex = 0;
  for (int g = 0; g < size(); ++g) {
    const int h = mesh_->hostOf(ranks_[g]);
    size_t k = std::find(hosts.begin(), hosts.end(), h) - hosts.begin();
    if (k == hosts.size()) {
      hosts.push_back(h);
      members.emplace_back();
    }
    if (g == me_) {
      myHost = static_cast<int>(k);
      myIndex = static_cast<int>(members[k].size());
    }
    members[k].push_back(ranks_[g]);
  }
  const size_t perHost = members[0].size();
  if (hosts.size() < 2 || perHost < 2) return;
  for (const auto& m : members)
    if (m.size() != perHost) return;
  std::vector<int> cross;
  for (const auto& m : members) cross.push_back(m[myIndex]);
  local_ = std::make_unique<Group>(mesh_, members[myHost], subgroupId(1 + myHost),
                                   name_ + "/host" + std::to_string(myHost), timeout_);
  cross_ = std::make_unique<Group>(mesh_, cross, subgroupId(0x10000 + myIndex),
                                   name_ + "/across" + std::to_string(myIndex), timeout_);
  // The pipelined path runs two threads per rank: spin less when they outnumber the cores.
  if (2 * mesh_->machineRanks() > Mesh::cores() && !std::getenv("DTRAIN_SPIN")) local_->spinLimit_ = cross_->spinLimit_ = 64;
  local_->setSmallBytes(smallBytes_);
  cross_->setSmallBytes(smallBytes_);
  cross_->setCompressWire(compressWire_);
}

void Group::setTimeout(double t) {
  timeout_ = t;
  if (local_) local_->setTimeout(t), cross_->setTimeout(t);
}

void Group::setSmallBytes(uint64_t b) {
  smallBytes_ = b;
  if (local_) local_->setSmallBytes(b), cross_->setSmallBytes(b);
}

void Group::setCompressWire(bool on) {
  compressWire_ = on;
  if (cross_) cross_->setCompressWire(on);
}

// kAuto takes the hierarchical path wherever the layout allows it: on the test bed (2 hosts x
// 2 ranks, 1 and 10 Gbit/s links) it beat the flat ring, and the one-hop path the flat ring
// takes below smallBytes(), at every size from 4 KiB to 64 MiB (benchmarks/allreduce.py).
bool Group::takesHierarchy(uint64_t count) const {
  return local_ && hierarchy_ != Hierarchy::kFlat && count >= static_cast<uint64_t>(size());
}

void Group::requireMember(const char* what) const {
  if (me_ >= 0) return;
  std::ostringstream os;
  for (size_t i = 0; i < ranks_.size(); ++i) os << (i ? "," : "") << ranks_[i];
  DTRAIN_THROW(kConfig, what, " on group ", name_, " (ranks [", os.str(), "]) from rank ",
               mesh_->rank(), ", which is not in it: call it only on the group's ranks, or pass "
               "group=None for the world");
}

Descriptor Group::begin(Kind kind, DType dt, uint64_t count, RedOp op, DType wire, int root,
                        bool collective) {
  requireMember(kindName(kind));
  Descriptor d{};
  d.magic = kDescriptorMagic;
  d.kind = kind;
  d.dtype = dt;
  d.wire = wire;
  d.op = op;
  d.group = id_;
  d.root = root;
  d.seq = collective ? ++seq_ : 0;
  d.count = count;
  d.tag = CallTag::current();
  return d;
}

std::vector<uint8_t>& Group::scratch(size_t bytes) {
  if (scratch_.size() < bytes) scratch_.resize(bytes);
  return scratch_;
}

void Group::enter(Collective& c) {
  std::string why;
  if (mesh_->broken(&why))
    DTRAIN_THROW(kComm, c.describe(), " on rank ", mesh_->rank(),
                 " cannot run: communication broke earlier (", why,
                 "). Restart the job (dtrain-run --max-restarts) after fixing the cause");
  if (c.desc.seq > 0 && mesh_->board().valid())
    mesh_->board().enter(mesh_->rank(), id_, gslot_, c.desc.seq);
}

std::vector<int64_t> Group::entered() const {
  std::vector<int64_t> out(size(), -1);
  if (!mesh_->board().valid()) return out;
  for (int g = 0; g < size(); ++g) {
    int r = globalRank(g);
    if (mesh_->isLocal(r)) out[g] = mesh_->board().lastEntered(r, id_, gslot_);
  }
  return out;
}

namespace {

// Where each unfinished stream stands, for whoever debugs a stall.
std::string legProgress(const Group& g, const Collective& c) {
  std::ostringstream legs;
  for (auto* ls : {&c.outs, &c.ins})
    for (const Leg& l : *ls)
      if (!l.finished())
        legs << " [" << (ls == &c.outs ? "to " : "from ") << g.globalRank(l.peer) << ": " << l.done << "/"
             << l.total << " bytes " << l.pair->debugState() << "]";
  return legs.str();
}

}  // namespace

void Group::checkHealth(Collective& c, double idleSeconds) {
  Board& board = mesh_->board();
  int who;
  std::string why;
  if (board.valid() && board.aborted(&who, &why) && who != mesh_->rank())
    DTRAIN_THROW(kComm, "rank ", who, " aborted: ", why, " (this rank's streams:", legProgress(*this, c), ")");
  // Another thread of this rank failed (the hierarchical allreduce runs two at once).
  if (mesh_->broken(&why))
    DTRAIN_THROW(kComm, "communication broke on this rank while ", c.describe(), " ran: ", why);
  for (auto* legs : {&c.ins, &c.outs})
    for (Leg& l : *legs)
      if (!l.finished()) l.pair->checkPeer();
  if (idleSeconds < timeout_) return;

  std::ostringstream missing, waiting;
  std::set<int> stalled;
  for (auto* legs : {&c.ins, &c.outs})
    for (Leg& l : *legs)
      if (!l.finished()) stalled.insert(globalRank(l.peer));
  int nMissing = 0;
  if (c.desc.seq > 0 && board.valid()) {
    for (int g = 0; g < size(); ++g) {
      int r = globalRank(g);
      if (g == me_ || !mesh_->isLocal(r)) continue;
      int64_t last = board.lastEntered(r, id_, gslot_);
      if (last < static_cast<int64_t>(c.desc.seq)) {
        missing << (nMissing++ ? ", " : "") << r << " (last entered call #" << last << ")";
      }
    }
  }
  int i = 0;
  for (int r : stalled) waiting << (i++ ? ", " : "") << r << (mesh_->isLocal(r) ? "" : " (remote)");

  DTRAIN_THROW(kTimeout, c.describe(), " in group ", name_, " timed out on rank ", mesh_->rank(),
               " after ", timeout_, " s without progress: ",
               nMissing ? "rank(s) " + missing.str() + " did not arrive; " : std::string(),
               "still waiting on rank(s) ", waiting.str(), legProgress(*this, c),
               ". If a rank is legitimately slow, raise dtrain.init(timeout=...)");
}

void Group::fail(Collective& c, const Error& e) {
  std::string msg = e.what();
  std::string context = c.describe() + " in group " + name_ + " failed on rank " +
                        std::to_string(mesh_->rank()) + ": ";
  if (msg.rfind(c.describe(), 0) == 0) context.clear();  // already says which call
  mesh_->breakWith(context + msg);
  const std::string earlier = mesh_->earlierFailure();
  if (!earlier.empty() && msg.find(earlier) == std::string::npos) msg += "; the job had already failed at " + earlier;
  throw Error(e.kind(), context + msg);
}

void Group::allreduce(void* buf, uint64_t count, DType dt, RedOp op, DType wire) {
  DTRAIN_CHECK(op != RedOp::kAvg || isFloating(dt), kConfig, "op='avg' needs a floating-point tensor, got ",
               dtypeName(dt), ": use op='sum' and divide, or convert the tensor to float");
  DTRAIN_CHECK(wire == dt || (dt == DType::kFloat32 && isHalf(wire)), kConfig, "compression=",
               wire == DType::kFloat16 ? "'fp16'" : "'bf16'", " applies to float32 tensors, got ",
               dtypeName(dt), ": pass compression=None for this tensor");
  if (takesHierarchy(count)) {
    requireMember("allreduce");
    ++seq_;  // this group's call count stays what it would be on the flat path
    hierarchicalAllreduce(static_cast<uint8_t*>(buf), count, dt, op, wire);
    return;
  }
  Descriptor d = begin(Kind::kAllreduce, dt, count, op, wire);
  if (size() == 1) return;
  if (!compressWire_) wire = dt;  // the descriptor still carries what the caller asked for
  uint8_t* p = static_cast<uint8_t*>(buf);
  if (count * dtypeSize(wire) <= smallBytes_ || count < static_cast<uint64_t>(size())) {
    DirectAllreduce c(*this, p, count, dt, op, wire, d);
    runCollective(*this, c);
  } else {
    RingReduce c(*this, p, count, dt, op, wire, /*allgather=*/true, /*shift=*/0, d);
    runCollective(*this, c);
  }
}

// Chunk by chunk: the host's ranks reduce-scatter the chunk over shared memory (local rank k
// ends up holding the host's sum of segment k), the ranks with local index k on every host
// allreduce segment k across the hosts (compressed, if asked), and the host's ranks allgather
// the segments. Across-host traffic per host falls from 2(n-1)/n of the buffer (one flat ring
// through every rank) to 2(H-1)/H, spread over L streams instead of one. A second thread
// carries chunk c across the hosts while this one reduces chunk c+1 and gathers chunk c-1;
// the two touch disjoint pairs (shared memory within the host, TCP across), and every rank
// runs the same schedule, so each pair sees the same order of calls on both ends.
void Group::hierarchicalAllreduce(uint8_t* buf, uint64_t count, DType dt, RedOp op, DType wire) {
  const RedOp part = op == RedOp::kAvg ? RedOp::kSum : op;  // divide once, by the world, at the end
  const size_t dsz = dtypeSize(dt);
  const int L = local_->size(), li = local_->rank();
  const uint64_t nChunks = std::max<uint64_t>(1, count * dsz / hierarchyChunkBytes());
  auto chunkStart = [&](uint64_t c) { return ringSegStart(count, static_cast<int>(nChunks), static_cast<int>(c)); };
  auto chunkCount = [&](uint64_t c) { return ringSegCount(count, static_cast<int>(nChunks), static_cast<int>(c)); };

  auto reduceWithinHost = [&](uint64_t c) {
    Descriptor d = local_->begin(Kind::kAllreduce, dt, chunkCount(c), part, dt);
    RingReduce rs(*local_, buf + chunkStart(c) * dsz, chunkCount(c), dt, part, dt, /*allgather=*/false,
                  /*shift=*/-1, d);
    runCollective(*local_, rs);
  };
  auto acrossHosts = [&](uint64_t c) {
    uint8_t* seg = buf + (chunkStart(c) + ringSegStart(chunkCount(c), L, li)) * dsz;
    const uint64_t n = ringSegCount(chunkCount(c), L, li);
    cross_->allreduce(seg, n, dt, part, wire);
    if (op == RedOp::kAvg) kernels().scale(dt, seg, n, 1.0 / size());
  };
  auto gatherWithinHost = [&](uint64_t c) {
    std::vector<uint64_t> bytes(L);
    for (int s = 0; s < L; ++s) bytes[s] = ringSegCount(chunkCount(c), L, s) * dsz;
    Descriptor d = local_->begin(Kind::kAllgather, dt, bytes[li] / dsz, RedOp::kSum, dt);
    uint8_t* chunk = buf + chunkStart(c) * dsz;
    RingAllgather ag(*local_, chunk + ringSegStart(chunkCount(c), L, li) * dsz, chunk, bytes, d);
    runCollective(*local_, ag);
  };

  if (nChunks == 1) {
    reduceWithinHost(0);
    acrossHosts(0);
    gatherWithinHost(0);
    return;
  }
  std::mutex mu;
  std::condition_variable cv;
  uint64_t reduced = 0, crossed = 0;
  bool stop = false;
  std::exception_ptr crossError;
  std::thread across([&] {
    try {
      for (uint64_t c = 0; c < nChunks; ++c) {
        {
          std::unique_lock<std::mutex> g(mu);
          cv.wait(g, [&] { return stop || reduced > c; });
          if (stop) return;
        }
        acrossHosts(c);
        std::lock_guard<std::mutex> g(mu);
        crossed = c + 1;
        cv.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> g(mu);
      crossError = std::current_exception();
      stop = true;
      cv.notify_all();
    }
  });
  auto halt = [&] {
    {
      std::lock_guard<std::mutex> g(mu);
      stop = true;
      cv.notify_all();
    }
    across.join();
  };
  try {
    for (uint64_t step = 0; step <= nChunks; ++step) {
      if (step < nChunks) {
        reduceWithinHost(step);
        std::lock_guard<std::mutex> g(mu);
        reduced = step + 1;
        cv.notify_all();
      }
      if (step == 0) continue;
      {
        std::unique_lock<std::mutex> g(mu);
        cv.wait(g, [&] { return crossError || crossed >= step; });
        if (crossError) break;
      }
      gatherWithinHost(step - 1);
    }
  } catch (...) {
    halt();
    throw;
  }
  halt();
  if (crossError) std::rethrow_exception(crossError);
}

void Group::broadcast(void* buf, uint64_t count, DType dt, int root) {
  DTRAIN_CHECK(root >= 0 && root < size(), kConfig, "broadcast root ", root, " is not a rank of group ",
               name_, " (size ", size(), ")");
  Descriptor d = begin(Kind::kBroadcast, dt, count, RedOp::kSum, dt, root);
  if (size() == 1) return;
  RingBroadcast c(*this, static_cast<uint8_t*>(buf), count * dtypeSize(dt), d);
  runCollective(*this, c);
}

void Group::allgather(const void* in, void* out, const std::vector<uint64_t>& counts, DType dt) {
  requireMember("allgather");
  DTRAIN_CHECK(counts.size() == ranks_.size(), kConfig, "allgather needs one count per rank: got ",
               counts.size(), " for ", ranks_.size(), " ranks");
  Descriptor d = begin(Kind::kAllgather, dt, counts[me_], RedOp::kSum, dt);
  std::vector<uint64_t> bytes(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) bytes[i] = counts[i] * dtypeSize(dt);
  if (size() == 1) {
    std::memcpy(out, in, bytes[0]);
    return;
  }
  RingAllgather c(*this, static_cast<const uint8_t*>(in), static_cast<uint8_t*>(out), bytes, d);
  runCollective(*this, c);
}

void Group::reduceScatter(const void* in, void* out, uint64_t count, DType dt, RedOp op, DType wire) {
  DTRAIN_CHECK(op != RedOp::kAvg || isFloating(dt), kConfig, "op='avg' needs a floating-point tensor, got ",
               dtypeName(dt), ": use op='sum' and divide, or convert the tensor to float");
  DTRAIN_CHECK(wire == dt || (dt == DType::kFloat32 && isHalf(wire)), kConfig,
               "compression applies to float32 tensors, got ", dtypeName(dt));
  Descriptor d = begin(Kind::kReduceScatter, dt, count * size(), op, wire);
  if (!compressWire_) wire = dt;
  const size_t dsz = dtypeSize(dt);
  if (size() == 1) {
    std::memcpy(out, in, count * dsz);
    return;
  }
  // The ring reduces in place, and the caller's input must stay as it was.
  std::vector<uint8_t> work(static_cast<const uint8_t*>(in),
                            static_cast<const uint8_t*>(in) + count * size() * dsz);
  RingReduce c(*this, work.data(), count * size(), dt, op, wire, /*allgather=*/false, /*shift=*/-1, d);
  runCollective(*this, c);
  std::memcpy(out, work.data() + me_ * count * dsz, count * dsz);
}

void Group::alltoall(const void* in, const std::vector<uint64_t>& sendCounts, void* out,
                     const std::vector<uint64_t>& recvCounts, DType dt) {
  requireMember("alltoall");
  DTRAIN_CHECK(sendCounts.size() == ranks_.size() && recvCounts.size() == ranks_.size(), kConfig,
               "alltoall needs one send and one receive count per rank (", ranks_.size(), ")");
  DTRAIN_CHECK(sendCounts[me_] == recvCounts[me_], kConfig, "alltoall: this rank sends ",
               sendCounts[me_], " elements to itself but expects ", recvCounts[me_]);
  Descriptor d = begin(Kind::kAlltoall, dt, 0, RedOp::kSum, dt);
  const size_t dsz = dtypeSize(dt);
  Exchange c(d);
  const uint8_t* src = static_cast<const uint8_t*>(in);
  uint8_t* dst = static_cast<uint8_t*>(out);
  uint64_t so = 0, ro = 0;
  for (int j = 0; j < size(); ++j) {
    if (j == me_) {
      std::memcpy(dst + ro, src + so, sendCounts[j] * dsz);
    } else {
      c.sendTo(pair(j), j, src + so, sendCounts[j] * dsz);
      c.recvFrom(pair(j), j, dst + ro, recvCounts[j] * dsz);
    }
    so += sendCounts[j] * dsz;
    ro += recvCounts[j] * dsz;
  }
  if (size() > 1) runCollective(*this, c);
}

void Group::send(const void* buf, uint64_t count, DType dt, int dst) {
  DTRAIN_CHECK(dst >= 0 && dst < size() && dst != me_, kConfig, "send to rank ", dst,
               ": the destination must be another rank of group ", name_, " (size ", size(), ")");
  Descriptor d = begin(Kind::kSend, dt, count, RedOp::kSum, dt, /*root=*/0, /*collective=*/false);
  Exchange c(d);
  c.sendTo(pair(dst), dst, static_cast<const uint8_t*>(buf), count * dtypeSize(dt));
  runCollective(*this, c);
}

void Group::recv(void* buf, uint64_t count, DType dt, int src) {
  DTRAIN_CHECK(src >= 0 && src < size() && src != me_, kConfig, "recv from rank ", src,
               ": the source must be another rank of group ", name_, " (size ", size(), ")");
  Descriptor d = begin(Kind::kSend, dt, count, RedOp::kSum, dt, /*root=*/0, /*collective=*/false);
  Exchange c(d);
  c.recvFrom(pair(src), src, static_cast<uint8_t*>(buf), count * dtypeSize(dt));
  runCollective(*this, c);
}

void Group::sendRecv(const void* sendBuf, uint64_t sendCount, int dst, void* recvBuf, uint64_t recvCount,
                     int src, DType dt) {
  DTRAIN_CHECK(dst == -1 || (dst >= 0 && dst < size() && dst != me_), kConfig, "sendrecv to rank ", dst,
               ": the destination must be another rank of group ", name_, " (size ", size(), "), or -1 for none");
  DTRAIN_CHECK(src == -1 || (src >= 0 && src < size() && src != me_), kConfig, "sendrecv from rank ", src,
               ": the source must be another rank of group ", name_, " (size ", size(), "), or -1 for none");
  Descriptor d = begin(Kind::kSend, dt, 0, RedOp::kSum, dt, /*root=*/0, /*collective=*/false);
  if (dst < 0 && src < 0) return;
  Exchange c(d);
  if (dst >= 0) c.sendTo(pair(dst), dst, static_cast<const uint8_t*>(sendBuf), sendCount * dtypeSize(dt));
  if (src >= 0) c.recvFrom(pair(src), src, static_cast<uint8_t*>(recvBuf), recvCount * dtypeSize(dt));
  runCollective(*this, c);
}

void Group::barrier() {
  Descriptor d = begin(Kind::kBarrier, DType::kUInt8, 0);
  if (size() == 1) return;
  Exchange c(d);
  for (int j = 0; j < size(); ++j) {
    if (j == me_) continue;
    c.sendTo(pair(j), j, nullptr, 0);
    c.recvFrom(pair(j), j, nullptr, 0);
  }
  runCollective(*this, c);
}

}  // namespace dtrain

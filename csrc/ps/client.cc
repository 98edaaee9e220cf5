#include "ps/client.h"

#include <algorithm>
#include <limits>

#include "common/error.h"
#include "kernels/cpu/optim.h"

namespace dtrain {
namespace ps {

Client::Client(const ClientOptions& o) : opts_(o) {
  const size_t S = o.hosts.size();
  DTRAIN_CHECK(S >= 1 && o.ports.size() == S && o.serverRanks.size() == S && o.bounds.size() == S + 1, kConfig,
               "parameter-server client: ", S, " hosts, ", o.ports.size(), " ports, ", o.serverRanks.size(),
               " ranks and ", o.bounds.size(), " bounds do not describe the same servers");
  links_.resize(S);
  const Deadline d = deadlineIn(o.timeout);
  uint64_t start = 0;
  for (size_t s = 0; s < S; ++s) {
    Link& l = links_[s];
    l.where = "parameter server rank " + std::to_string(o.serverRanks[s]) + " (" + o.hosts[s] + ":" +
              std::to_string(o.ports[s]) + ")";
    l.begin = o.bounds[s];
    l.count = o.bounds[s + 1] - o.bounds[s];
    l.sock = Socket::connect(o.hosts[s], o.ports[s], d, l.where);
    l.sock.setNoDelay();
    authenticateAsClient(l.sock, o.token, "ps", d);
    Header h = make(Msg::kHello, o.worker);
    h.count = l.count;
    h.clock = o.layoutHash;
    h.aux = static_cast<uint32_t>(o.numGroups);
    l.sock.sendAll(&h, sizeof(h), d, "hello to a parameter server");
    Header r = expectReply(l, Msg::kWelcome, "joining");
    if (s == 0) start = r.clock;
    DTRAIN_CHECK(r.clock == start, kComm, "parameter servers disagree on where worker rank ", o.rank,
                 " starts: step ", start, " on ", links_[0].where, ", ", r.clock, " on ", l.where);
  }
  step_ = start;
}

Client::~Client() {
  if (worker_.joinable()) worker_.join();
}

void Client::lost(Link& l, const char* doing, const Error& e) {
  DTRAIN_THROW(kComm, "worker rank ", opts_.rank, " lost ", l.where, " while ", doing, ": ", e.what(),
               ". A parameter server holds a shard of the model, so training cannot go on without it; restart "
               "the job (dtrain-run --max-restarts) to resume from the last checkpoint");
}

std::string Client::readText(Link& l, const Header& h) {
  DTRAIN_CHECK(h.bytes <= kMaxTextBytes, kComm, l.where, " sent a ", h.bytes, "-byte text; at most ",
               kMaxTextBytes, " are allowed");
  std::string text(h.bytes, '\0');
  if (h.bytes) l.sock.recvAll(&text[0], h.bytes, deadlineIn(opts_.timeout), "a parameter server's text");
  return text;
}

Header Client::expectReply(Link& l, Msg type, const char* doing) {
  Header h;
  try {
    // The server itself answers within its timeout (with an error if a peer is too slow).
    l.sock.recvAll(&h, sizeof(h), deadlineIn(opts_.timeout + 30.0), "a parameter server's reply");
  } catch (const Error& e) {
    lost(l, doing, e);
  }
  const std::string bad = checkEnvelope(h);
  DTRAIN_CHECK(bad.empty(), kComm, l.where, " sent a malformed reply while ", doing, ": ", bad);
  if (static_cast<Msg>(h.type) == Msg::kError) {
    const std::string why = readText(l, h);
    DTRAIN_THROW(kComm, l.where, " refused worker rank ", opts_.rank, " while ", doing, ": ", why);
  }
  DTRAIN_CHECK(h.type == static_cast<uint16_t>(type), kComm, l.where, " answered ", msgName(h.type), " while ",
               doing, "; expected ", msgName(static_cast<uint16_t>(type)));
  return h;
}

void Client::start(const float* grad, float* params, const std::vector<double>& lrs, DType wire) {
  DTRAIN_CHECK(!finished_, kConfig, "worker rank ", opts_.rank, " already told the parameter servers it finished");
  DTRAIN_CHECK(!busy(), kConfig, "a push is already in flight on worker rank ", opts_.rank, ": wait() for it first");
  DTRAIN_CHECK(lrs.size() == static_cast<size_t>(opts_.numGroups), kConfig, "got ", lrs.size(),
               " learning rates for ", opts_.numGroups, " parameter group(s)");
  DTRAIN_CHECK(wire == DType::kFloat32 || isHalf(wire), kConfig, "gradients travel as float32, float16 or "
               "bfloat16, not ", dtypeName(wire));
  error_ = nullptr;
  worker_ = std::thread([=] {
    try {
      exchange(grad, params, lrs, wire);
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

void Client::exchange(const float* grad, float* params, std::vector<double> lrs, DType wire) {
  const auto t0 = Clock::now();
  const uint64_t lrBytes = lrs.size() * sizeof(double);
  for (Link& l : links_) {
    Header h = make(Msg::kPushPull, opts_.worker);
    h.aux = static_cast<uint32_t>(wire);
    h.clock = step_;
    h.count = l.count;
    h.bytes = l.count * dtypeSize(wire) + lrBytes;
    const void* payload = grad + l.begin;
    if (wire != DType::kFloat32) {
      l.wire.resize(l.count * dtypeSize(wire));
      kernels::cpuTable().convert(wire, l.wire.data(), DType::kFloat32, grad + l.begin,
                                  static_cast<int64_t>(l.count), 1.f, false, false);
      payload = l.wire.data();
    }
    try {
      const Deadline d = deadlineIn(opts_.timeout);
      l.sock.sendAll(&h, sizeof(h), d, "a push");
      l.sock.sendAll(payload, l.count * dtypeSize(wire), d, "a push");
      l.sock.sendAll(lrs.data(), lrBytes, d, "a push");
    } catch (const Error& e) {
      lost(l, "pushing a gradient", e);
    }
  }
  Exchange x;
  x.slowest = std::numeric_limits<uint64_t>::max();
  for (size_t s = 0; s < links_.size(); ++s) {
    Link& l = links_[s];
    Header h = expectReply(l, Msg::kParams, "waiting for fresh parameters");
    DTRAIN_CHECK(h.count == l.count && h.bytes == l.count * sizeof(float), kComm, l.where, " sent ", h.count,
                 " parameters (", h.bytes, " bytes); its shard holds ", l.count);
    try {
      l.sock.recvAll(params + l.begin, h.bytes, deadlineIn(opts_.timeout), "parameters");
    } catch (const Error& e) {
      lost(l, "receiving parameters", e);
    }
    x.lead = std::max<uint64_t>(x.lead, h.aux);
    x.slowest = std::min(x.slowest, h.offset);
    if (s == 0) x.applied = h.clock;
  }
  x.step = ++step_;
  x.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  result_ = x;
}

Exchange Client::wait() {
  if (worker_.joinable()) worker_.join();
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
  return result_;
}

void Client::pull(float* params) {
  DTRAIN_CHECK(!busy(), kConfig, "pull() while a push is in flight: wait() first");
  for (Link& l : links_) {
    Header h = make(Msg::kPull, opts_.worker);
    h.count = l.count;
    try {
      l.sock.sendAll(&h, sizeof(h), deadlineIn(opts_.timeout), "a pull");
    } catch (const Error& e) {
      lost(l, "asking for parameters", e);
    }
  }
  for (Link& l : links_) {
    Header h = expectReply(l, Msg::kParams, "pulling parameters");
    DTRAIN_CHECK(h.count == l.count && h.bytes == l.count * sizeof(float), kComm, l.where, " sent ", h.count,
                 " parameters; its shard holds ", l.count);
    l.sock.recvAll(params + l.begin, h.bytes, deadlineIn(opts_.timeout), "parameters");
  }
}

std::vector<std::string> Client::control(uint32_t kind, uint64_t step, const std::string& path) {
  DTRAIN_CHECK(!busy(), kConfig, "a checkpoint request while a push is in flight: wait() first");
  DTRAIN_CHECK(path.size() <= kMaxTextBytes, kConfig, "checkpoint path of ", path.size(), " bytes; at most ",
               kMaxTextBytes);
  const char* doing = kind == kSave ? "saving its shard" : "loading its shard";
  for (Link& l : links_) {
    Header h = make(Msg::kControl, opts_.worker);
    h.aux = kind;
    h.clock = step;
    h.bytes = path.size();
    try {
      const Deadline d = deadlineIn(opts_.timeout);
      l.sock.sendAll(&h, sizeof(h), d, "a checkpoint request");
      l.sock.sendAll(path.data(), path.size(), d, "a checkpoint request");
    } catch (const Error& e) {
      lost(l, doing, e);
    }
  }
  std::vector<std::string> out;
  std::string failed;
  for (Link& l : links_) {
    Header h = expectReply(l, Msg::kReply, doing);
    std::string text = readText(l, h);
    if (!h.aux && failed.empty()) failed = l.where + " failed " + doing + ": " + text;
    out.push_back(std::move(text));
  }
  DTRAIN_CHECK(failed.empty(), kComm, failed);
  return out;
}

std::vector<std::string> Client::stats() {
  DTRAIN_CHECK(!busy(), kConfig, "stats() while a push is in flight: wait() first");
  std::vector<std::string> out;
  for (Link& l : links_) {
    Header h = make(Msg::kStats, opts_.worker);
    try {
      l.sock.sendAll(&h, sizeof(h), deadlineIn(opts_.timeout), "a stats request");
    } catch (const Error& e) {
      lost(l, "asking for statistics", e);
    }
  }
  for (Link& l : links_) out.push_back(readText(l, expectReply(l, Msg::kReply, "asking for statistics")));
  return out;
}

void Client::done() {
  if (worker_.joinable()) worker_.join();
  if (finished_) return;
  finished_ = true;
  for (Link& l : links_) {
    Header h = make(Msg::kDone, opts_.worker);
    try {
      l.sock.sendAll(&h, sizeof(h), deadlineIn(5.0), "done");
    } catch (const Error&) {
    }
    l.sock.close();
  }
}

}  // namespace ps
}  // namespace dtrain

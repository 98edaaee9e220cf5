#include "ps/server.h"

#include <sys/socket.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>

#include "common/error.h"
#include "common/log.h"
#include "kernels/cpu/optim.h"

namespace dtrain {
namespace ps {

struct Server::Conn {
  Socket sock;
  std::string peer;
  int worker = -1;
  std::vector<float> grad;  // the push, as float32
  std::vector<uint8_t> wire;
  std::vector<float> out;   // parameters to send back
};

namespace {

constexpr uint64_t kNobody = std::numeric_limits<uint64_t>::max();
constexpr size_t kHistogram = 64;

Deadline idleDeadline() { return deadlineIn(365.0 * 86400); }  // a worker may compute for long; close ends it

}  // namespace

Server::Server(const ServerOptions& o, std::vector<GroupSlice> groups, const float* params, uint64_t shardCount)
    : opts_(o), groups_(std::move(groups)), n_(shardCount), leadHistogram_(kHistogram, 0) {
  DTRAIN_CHECK(o.optimizer == "sgd" || o.optimizer == "adam" || o.optimizer == "adamw", kConfig,
               "parameter server optimizer '", o.optimizer, "' is not one of sgd, adam, adamw");
  DTRAIN_CHECK(o.numWorkers >= 1, kConfig, "a parameter server needs at least one worker, got ", o.numWorkers);
  for (const GroupSlice& g : groups_)
    DTRAIN_CHECK(g.begin <= g.end && g.end <= n_ && g.group >= 0 && g.group < o.numGroups, kConfig,
                 "parameter group slice [", g.begin, ", ", g.end, ") group ", g.group, " does not fit a shard of ",
                 n_, " elements and ", o.numGroups, " groups");
  params_.assign(params, params + n_);
  const int states = stateBuffers();
  if (states >= 1) state1_.assign(n_, 0.f);
  if (states >= 2) state2_.assign(n_, 0.f);
  if (o.staleness == 0) acc_.assign(n_, 0.f);
  workers_.resize(o.numWorkers);
  listener_ = Socket::listen(o.bindHost, 0);
  port_ = listener_.localPort();
  acceptor_ = std::thread([this] { acceptLoop(); });
}

Server::~Server() { stop(); }

int Server::stateBuffers() const {
  if (opts_.optimizer != "sgd") return 2;
  for (const GroupSlice& g : groups_)
    if (g.momentum != 0) return 1;
  return 0;
}

void Server::stop() {
  if (stopping_.exchange(true)) return;
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard<std::mutex> g(connMu_);
    for (auto& c : conns_)
      if (c->sock.valid()) ::shutdown(c->sock.fd(), SHUT_RDWR);
  }
  cv_.notify_all();
  controlCv_.notify_all();
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> g(connMu_);
    threads.swap(threads_);
  }
  for (auto& t : threads) t.join();
  listener_.close();
}

void Server::acceptLoop() {
  while (!stopping_) {
    std::string peer;
    Socket s;
    try {
      s = listener_.accept(deadlineIn(0.2), &peer);
    } catch (const Error& e) {
      if (stopping_) break;
      logWarning("parameter server rank ", opts_.rank, ": accept failed: ", e.what());
      continue;
    }
    if (!s.valid()) continue;
    s.setNoDelay();  // a reply is a header and a payload: Nagle would hold the second for an ACK
    auto c = std::make_shared<Conn>();
    c->sock = std::move(s);
    c->peer = peer;
    std::lock_guard<std::mutex> g(connMu_);
    conns_.push_back(c);
    threads_.emplace_back([this, c] { serve(c); });
  }
}

void Server::serve(std::shared_ptr<Conn> c) {
  // However this ends, the connection closes here (under connMu_, so stop() never shuts down a
  // descriptor number that was closed and reused).
  struct Closer {
    Server* s;
    Conn* c;
    ~Closer() {
      std::lock_guard<std::mutex> g(s->connMu_);
      c->sock.close();
    }
  } closer{this, c.get()};
  std::string why;
  if (!authenticateAsServer(c->sock, opts_.token, "ps", deadlineIn(10.0), &why)) {
    {
      std::lock_guard<std::mutex> g(mu_);
      ++rejected_;
    }
    if (!stopping_)
      logWarning("parameter server rank ", opts_.rank, " refused a connection from ", c->peer, ": ", why,
                 " (it does not hold this job's DTRAIN_JOB_TOKEN); nothing it sent was read");
    return;
  }
  std::string ended;
  try {
    for (;;) {
      Header h;
      c->sock.recvAll(&h, sizeof(h), idleDeadline(), "a worker's next message");
      const std::string bad = checkEnvelope(h);
      if (!bad.empty()) {
        reject(*c, bad);
        ended = "it sent a malformed message";
        break;
      }
      if (!handle(*c, h)) {
        ended = "its connection was closed";
        break;
      }
    }
  } catch (const Error& e) {
    ended = e.what();
  }
  if (c->worker < 0) return;
  std::lock_guard<std::mutex> g(mu_);
  Worker& w = workers_[c->worker];
  w.connected = false;
  if (!w.done && !stopping_) dropWorkerLocked(c->worker, ended);
}

void Server::reject(Conn& c, const std::string& why) {
  {
    std::lock_guard<std::mutex> g(mu_);
    ++rejected_;
  }
  logWarning("parameter server rank ", opts_.rank, " rejected a message from ", c.peer,
             c.worker >= 0 ? " (worker rank " + std::to_string(opts_.firstWorkerRank + c.worker) + ")" : std::string(),
             ": ", why, "; nothing from it was applied and its connection is closed");
  try {
    sendError(c, why);
  } catch (const Error&) {
  }
}

void Server::sendError(Conn& c, const std::string& why) {
  Header h = make(Msg::kError, c.worker);
  h.bytes = why.size();
  Deadline d = deadlineIn(5.0);
  c.sock.sendAll(&h, sizeof(h), d, "an error to a worker");
  c.sock.sendAll(why.data(), why.size(), d, "an error to a worker");
}

void Server::sendReply(Conn& c, bool ok, const std::string& text) {
  Header h = make(Msg::kReply, c.worker);
  h.aux = ok ? 1 : 0;
  h.bytes = text.size();
  Deadline d = deadlineIn(opts_.timeout);
  c.sock.sendAll(&h, sizeof(h), d, "a reply to a worker");
  c.sock.sendAll(text.data(), text.size(), d, "a reply to a worker");
}

void Server::sendParams(Conn& c, uint64_t lead, uint64_t slowest, uint64_t applied) {
  Header h = make(Msg::kParams, c.worker);
  h.aux = static_cast<uint32_t>(std::min<uint64_t>(lead, 0xffffffffu));
  h.offset = slowest;
  h.clock = applied;
  h.count = n_;
  h.bytes = n_ * sizeof(float);
  Deadline d = deadlineIn(opts_.timeout);
  c.sock.sendAll(&h, sizeof(h), d, "parameters to a worker");
  c.sock.sendAll(c.out.data(), h.bytes, d, "parameters to a worker");
}

uint64_t Server::slowestLive() const {
  uint64_t m = kNobody;
  for (size_t w = 0; w < workers_.size(); ++w)
    if (live(static_cast<int>(w))) m = std::min(m, workers_[w].clock);
  return m;
}

std::string Server::laggardsLocked(uint64_t below) const {
  std::ostringstream os;
  int n = 0;
  for (size_t w = 0; w < workers_.size(); ++w)
    if (live(static_cast<int>(w)) && workers_[w].clock < below)
      os << (n++ ? ", " : "") << opts_.firstWorkerRank + static_cast<int>(w) << " (at step "
         << workers_[w].clock << (workers_[w].connected ? "" : ", never connected") << ")";
  return os.str();
}

void Server::dropWorkerLocked(int w, const std::string& why) {
  Worker& s = workers_[w];
  if (s.lost || s.done) return;
  s.lost = true;
  s.connected = false;
  int left = 0;
  for (size_t i = 0; i < workers_.size(); ++i) left += live(static_cast<int>(i)) ? 1 : 0;
  logWarning("parameter server rank ", opts_.rank, " lost worker rank ", opts_.firstWorkerRank + w, " at step ",
             s.clock, " (", why, "); it no longer counts for the staleness clock and training goes on with ", left,
             " worker(s)");
  maybeApplySyncLocked();
  cv_.notify_all();
  controlCv_.notify_all();
}

void Server::maybeApplySyncLocked() {
  if (opts_.staleness != 0 || accContributors_ == 0) return;
  for (size_t w = 0; w < workers_.size(); ++w)
    if (live(static_cast<int>(w)) && workers_[w].clock <= applied_) return;  // still owes this step
  applyLocked(acc_.data(), 1.0f / static_cast<float>(accContributors_), pendingLrs_.data());
  std::fill(acc_.begin(), acc_.end(), 0.f);
  accContributors_ = 0;
  ++applied_;
  cv_.notify_all();
}

void Server::applyLocked(const float* grad, float gradScale, const double* lrs) {
  const auto t0 = Clock::now();
  const bool adam = opts_.optimizer != "sgd";
  for (GroupSlice& g : groups_) {
    const uint64_t len = g.end - g.begin;
    if (len == 0) continue;
    if (lrs) g.lr = lrs[g.group];
    kernels::TensorLists t;
    t.dtype = DType::kFloat32;
    t.numel = {static_cast<int64_t>(len)};
    std::array<void*, kernels::kSlots> slots{};
    slots[kernels::kParam] = params_.data() + g.begin;
    slots[kernels::kGrad] = const_cast<float*>(grad) + g.begin;
    const float scale = g.maximize ? -gradScale : gradScale;
    if (adam) {
      slots[kernels::kExpAvg] = state1_.data() + g.begin;
      slots[kernels::kExpAvgSq] = state2_.data() + g.begin;
      t.ptr = {slots};
      const int64_t step = ++g.step;
      kernels::AdamArgs a;
      a.gradScale = scale;
      a.beta1Comp = static_cast<float>(1 - g.beta1);
      a.beta2 = static_cast<float>(g.beta2);
      a.beta2Comp = static_cast<float>(1 - g.beta2);
      a.eps = static_cast<float>(g.eps);
      a.weightDecay = static_cast<float>(g.weightDecay);
      a.decayFactor = static_cast<float>(1 - g.lr * g.weightDecay);
      a.negStepSize = static_cast<float>(-(g.lr / (1 - std::pow(g.beta1, static_cast<double>(step)))));
      a.invBc2Sqrt = static_cast<float>(1 / std::sqrt(1 - std::pow(g.beta2, static_cast<double>(step))));
      kernels::Decay decay = g.weightDecay == 0 ? kernels::Decay::kNone
                             : opts_.optimizer == "adamw" ? kernels::Decay::kDecoupled
                                                          : kernels::Decay::kL2;
      kernels::adamStep(t, decay, false, a, false, 1);
    } else {
      kernels::Momentum m = kernels::Momentum::kNone;
      if (g.momentum != 0) {
        slots[kernels::kMomentumBuf] = state1_.data() + g.begin;
        m = g.momentumStarted ? kernels::Momentum::kLater : kernels::Momentum::kFirst;
        g.momentumStarted = true;
      }
      t.ptr = {slots};
      kernels::SgdArgs a;
      a.gradScale = scale;
      a.weightDecay = static_cast<float>(g.weightDecay);
      a.momentum = static_cast<float>(g.momentum);
      a.dampComp = static_cast<float>(1 - g.dampening);
      a.negLr = static_cast<float>(-g.lr);
      kernels::sgdStep(t, g.weightDecay != 0, m, g.nesterov, a, false, 1);
    }
  }
  applySeconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
  appliedBytes_ += n_ * sizeof(float);
}

bool Server::handle(Conn& c, const Header& h) {
  const Msg type = static_cast<Msg>(h.type);
  if (c.worker < 0) {  // the first message names the worker
    if (type != Msg::kHello) {
      reject(c, std::string("the first message must be Hello, got ") + msgName(h.type));
      return false;
    }
    if (h.worker < 0 || h.worker >= opts_.numWorkers) {
      reject(c, "worker index " + std::to_string(h.worker) + " is outside 0.." + std::to_string(opts_.numWorkers - 1));
      return false;
    }
    if (h.count != n_ || h.clock != opts_.layoutHash || h.aux != static_cast<uint32_t>(opts_.numGroups) || h.bytes) {
      reject(c, "the worker's model does not match this server's: it expects " + std::to_string(h.count) +
                    " elements in " + std::to_string(h.aux) + " group(s) (layout " + std::to_string(h.clock) +
                    "), this shard holds " + std::to_string(n_) + " in " + std::to_string(opts_.numGroups) +
                    " (layout " + std::to_string(opts_.layoutHash) + "); every rank must build the same model "
                    "and optimizer");
      return false;
    }
    uint64_t start;
    {
      std::lock_guard<std::mutex> g(mu_);
      Worker& w = workers_[h.worker];
      if (w.connected) {
        ++rejected_;
        logWarning("parameter server rank ", opts_.rank, " refused a second connection for worker rank ",
                   opts_.firstWorkerRank + h.worker, " from ", c.peer, ": that worker is connected");
        return false;
      }
      if (w.lost || w.done) {  // a restarted worker: it starts with the slowest live worker
        const uint64_t slowest = slowestLive();
        w.clock = opts_.staleness == 0 ? applied_ : slowest == kNobody ? w.clock : slowest;
        w.lost = w.done = false;
        ++w.rejoins;
        logWarning("parameter server rank ", opts_.rank, ": worker rank ", opts_.firstWorkerRank + h.worker,
                   " rejoined at step ", w.clock);
      }
      w.connected = true;
      start = w.clock;
      c.worker = h.worker;
    }
    Header r = make(Msg::kWelcome, c.worker);
    r.clock = start;
    r.count = n_;
    c.sock.sendAll(&r, sizeof(r), deadlineIn(opts_.timeout), "a welcome to a worker");
    return true;
  }
  if (h.worker != c.worker) {
    reject(c, "the message claims worker " + std::to_string(h.worker) + " on the connection of worker " +
                  std::to_string(c.worker));
    return false;
  }
  switch (type) {
    case Msg::kPushPull: {
      if (!wireDtypeOk(h.aux)) {
        reject(c, "gradient dtype code " + std::to_string(h.aux) + " is not float32, float16 or bfloat16");
        return false;
      }
      const DType wire = static_cast<DType>(h.aux);
      const uint64_t lrBytes = static_cast<uint64_t>(opts_.numGroups) * sizeof(double);
      if (h.offset != 0 || h.count != n_ || h.bytes != n_ * dtypeSize(wire) + lrBytes) {
        reject(c, "a push of " + std::to_string(h.count) + " elements at " + std::to_string(h.offset) + " with " +
                      std::to_string(h.bytes) + " payload bytes; this shard takes " + std::to_string(n_) + " " +
                      dtypeName(wire) + " elements at 0 plus " + std::to_string(opts_.numGroups) +
                      " learning rates (" + std::to_string(n_ * dtypeSize(wire) + lrBytes) + " bytes)");
        return false;
      }
      uint64_t expected;
      {
        std::lock_guard<std::mutex> g(mu_);
        expected = workers_[c.worker].clock;
      }
      if (h.clock != expected) {
        reject(c, "a push for step " + std::to_string(h.clock) + " from a worker at step " + std::to_string(expected));
        return false;
      }
      c.grad.resize(n_);
      const Deadline d = deadlineIn(opts_.timeout);
      if (wire == DType::kFloat32) {
        c.sock.recvAll(c.grad.data(), n_ * sizeof(float), d, "a gradient");
      } else {
        c.wire.resize(n_ * dtypeSize(wire));
        c.sock.recvAll(c.wire.data(), c.wire.size(), d, "a gradient");
        kernels::cpuTable().convert(DType::kFloat32, c.grad.data(), wire, c.wire.data(), static_cast<int64_t>(n_),
                                    1.f, false, false);
      }
      std::vector<double> lrs(opts_.numGroups);
      c.sock.recvAll(lrs.data(), lrBytes, d, "learning rates");
      for (double lr : lrs)
        if (!std::isfinite(lr) || lr < 0) {
          reject(c, "learning rate " + std::to_string(lr) + " is not a finite number >= 0");
          return false;
        }
      std::unique_lock<std::mutex> g(mu_);
      const auto now = Clock::now();
      if (pushes_ == 0) firstPush_ = now;
      lastPush_ = now;
      ++pushes_;
      pushBytes_ += h.bytes + sizeof(Header);
      Worker& w = workers_[c.worker];
      ++w.pushes;
      w.bytes += h.bytes + sizeof(Header);
      if (opts_.staleness == 0) {
        kernels::cpuTable().convert(DType::kFloat32, acc_.data(), DType::kFloat32, c.grad.data(),
                                    static_cast<int64_t>(n_), 1.f, true, false);
        ++accContributors_;
        pendingLrs_ = lrs;
        ++w.clock;
        maybeApplySyncLocked();
      } else {
        applyLocked(c.grad.data(), 1.f, lrs.data());
        ++applied_;
        ++w.clock;
        cv_.notify_all();
      }
      if (opts_.staleness >= 0) {
        const uint64_t s = static_cast<uint64_t>(opts_.staleness);
        const Deadline until = deadlineIn(opts_.timeout);
        bool ok = cv_.wait_until(g, until, [&] {
          const uint64_t slowest = slowestLive();
          return stopping_ || slowest == kNobody || w.clock <= slowest + s;
        });
        if (stopping_) return false;
        if (!ok) {
          const std::string slow = laggardsLocked(w.clock - s);
          g.unlock();
          sendError(c, "worker rank " + std::to_string(opts_.firstWorkerRank + c.worker) + " is at step " +
                           std::to_string(h.clock + 1) + " and may lead the slowest live worker by at most " +
                           std::to_string(s) + " (staleness=" + std::to_string(s) + "), but worker rank(s) " + slow +
                           " made no progress for " + std::to_string(opts_.timeout) +
                           " s; if a worker is legitimately slow, raise dtrain.init(timeout=...)");
          return false;
        }
      }
      const uint64_t slowest = slowestLive();
      const uint64_t lead = slowest == kNobody || slowest > w.clock ? 0 : w.clock - slowest;
      ++leadHistogram_[std::min<uint64_t>(lead, kHistogram - 1)];
      maxLead_ = std::max(maxLead_, lead);
      c.out.assign(params_.begin(), params_.end());
      const uint64_t applied = applied_;
      g.unlock();
      sendParams(c, lead, slowest == kNobody ? w.clock : slowest, applied);
      return true;
    }
    case Msg::kPull: {
      if (h.bytes != 0 || h.count != n_) {
        reject(c, "a Pull must carry no payload and count this shard's " + std::to_string(n_) + " elements");
        return false;
      }
      uint64_t slowest, applied;
      {
        std::lock_guard<std::mutex> g(mu_);
        slowest = slowestLive();
        applied = applied_;
        c.out.assign(params_.begin(), params_.end());
      }
      sendParams(c, 0, slowest == kNobody ? 0 : slowest, applied);
      return true;
    }
    case Msg::kControl: {
      if (h.bytes > kMaxTextBytes || (h.aux != kSave && h.aux != kLoad)) {
        reject(c, "a Control message must be save (1) or load (2) with a path of at most " +
                      std::to_string(kMaxTextBytes) + " bytes, got kind " + std::to_string(h.aux) + " and " +
                      std::to_string(h.bytes) + " bytes");
        return false;
      }
      auto req = std::make_shared<ControlRequest>();
      req->kind = h.aux;
      req->step = h.clock;
      req->worker = c.worker;
      req->path.resize(h.bytes);
      c.sock.recvAll(&req->path[0], h.bytes, deadlineIn(opts_.timeout), "a control path");
      {
        std::lock_guard<std::mutex> g(controlMu_);
        req->id = nextControlId_++;
        controlQueue_.push_back(req);
        controlPending_[req->id] = req;
      }
      controlCv_.notify_all();
      std::unique_lock<std::mutex> g(controlMu_);
      const bool done = controlCv_.wait_until(g, deadlineIn(opts_.timeout), [&] { return req->finished || stopping_; });
      controlPending_.erase(req->id);
      g.unlock();
      if (stopping_) return false;
      sendReply(c, done && req->ok,
                done ? req->message
                     : "the server did not finish the request in " + std::to_string(opts_.timeout) + " s");
      return true;
    }
    case Msg::kStats: {
      if (h.bytes != 0) {
        reject(c, "a Stats request carries no payload");
        return false;
      }
      sendReply(c, true, statsJson());
      return true;
    }
    case Msg::kDone: {
      std::lock_guard<std::mutex> g(mu_);
      workers_[c.worker].done = true;
      workers_[c.worker].connected = false;
      maybeApplySyncLocked();
      cv_.notify_all();
      controlCv_.notify_all();
      return false;
    }
    default:
      reject(c, std::string("a worker may not send ") + msgName(h.type));
      return false;
  }
}

ControlRequest Server::nextControl(double seconds, bool* finished) {
  auto allFinished = [this] {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t w = 0; w < workers_.size(); ++w)
      if (live(static_cast<int>(w))) return false;
    return true;
  };
  std::unique_lock<std::mutex> g(controlMu_);
  controlCv_.wait_for(g, std::chrono::duration<double>(seconds),
                      [&] { return !controlQueue_.empty() || stopping_ || allFinished(); });
  *finished = allFinished() || stopping_;
  if (controlQueue_.empty()) return ControlRequest{};
  auto req = controlQueue_.front();
  controlQueue_.pop_front();
  return *req;
}

void Server::completeControl(uint64_t id, bool ok, const std::string& message) {
  {
    std::lock_guard<std::mutex> g(controlMu_);
    auto it = controlPending_.find(id);
    if (it == controlPending_.end()) return;  // the worker gave up waiting
    it->second->ok = ok;
    it->second->message = message;
    it->second->finished = true;
  }
  controlCv_.notify_all();
}

std::vector<GroupSlice> Server::snapshot(float* params, float* state1, float* state2) {
  std::lock_guard<std::mutex> g(mu_);
  std::memcpy(params, params_.data(), n_ * sizeof(float));
  if (state1 && !state1_.empty()) std::memcpy(state1, state1_.data(), n_ * sizeof(float));
  if (state2 && !state2_.empty()) std::memcpy(state2, state2_.data(), n_ * sizeof(float));
  return groups_;
}

void Server::restore(const float* params, const float* state1, const float* state2,
                     const std::vector<GroupSlice>& groups) {
  std::lock_guard<std::mutex> g(mu_);
  DTRAIN_CHECK(groups.size() == groups_.size(), kConfig, "the checkpoint's shard has ", groups.size(),
               " group slice(s), this server ", groups_.size(), ": load it into the same model and optimizer");
  std::memcpy(params_.data(), params, n_ * sizeof(float));
  if (state1 && !state1_.empty()) std::memcpy(state1_.data(), state1, n_ * sizeof(float));
  if (state2 && !state2_.empty()) std::memcpy(state2_.data(), state2, n_ * sizeof(float));
  for (size_t i = 0; i < groups_.size(); ++i) {
    groups_[i].step = groups[i].step;
    groups_[i].momentumStarted = groups[i].momentumStarted;
  }
  if (!acc_.empty()) std::fill(acc_.begin(), acc_.end(), 0.f);
  accContributors_ = 0;
}

std::string Server::statsJson() {
  std::lock_guard<std::mutex> g(mu_);
  std::ostringstream os;
  const double seconds = pushes_ > 1 ? std::chrono::duration<double>(lastPush_ - firstPush_).count() : 0.0;
  size_t last = leadHistogram_.size();
  while (last > 1 && leadHistogram_[last - 1] == 0) --last;
  os << "{\"rank\": " << opts_.rank << ", \"staleness\": " << opts_.staleness << ", \"elements\": " << n_
     << ", \"updates_applied\": " << applied_ << ", \"pushes\": " << pushes_ << ", \"push_bytes\": " << pushBytes_
     << ", \"seconds\": " << seconds << ", \"apply_seconds\": " << applySeconds_
     << ", \"applied_bytes\": " << appliedBytes_ << ", \"rejected\": " << rejected_ << ", \"max_lead\": " << maxLead_
     << ", \"lead_histogram\": [";
  for (size_t i = 0; i < last; ++i) os << (i ? ", " : "") << leadHistogram_[i];
  os << "], \"workers\": [";
  for (size_t w = 0; w < workers_.size(); ++w) {
    const Worker& s = workers_[w];
    const char* state = s.done ? "done" : s.lost ? "lost" : s.connected ? "live" : "waiting";
    os << (w ? ", " : "") << "{\"rank\": " << opts_.firstWorkerRank + static_cast<int>(w) << ", \"step\": " << s.clock
       << ", \"pushes\": " << s.pushes << ", \"bytes\": " << s.bytes << ", \"rejoins\": " << s.rejoins
       << ", \"state\": \"" << state << "\"}";
  }
  os << "]}";
  return os.str();
}

}  // namespace ps
}  // namespace dtrain

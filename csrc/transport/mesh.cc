#include "transport/mesh.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/error.h"
#include "common/hmac.h"
#include "common/log.h"
#include "transport/ring_channel.h"
#include "transport/shm/shm_pair.h"
#include "transport/tcp/tcp_pair.h"

namespace dtrain {
namespace {

// Ranks with equal ids share memory. Processes in different network namespaces (containers,
// the test bed's hosts) count as different hosts: they reach each other over the network.
std::string detectHostId() {
  char name[256] = {0};
  ::gethostname(name, sizeof(name) - 1);
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::string boot;
  std::getline(f, boot);
  char ns[64] = {0};
  const ssize_t n = ::readlink("/proc/self/ns/net", ns, sizeof(ns) - 1);
  return std::string(name) + "/" + boot + (n > 0 ? "/" + std::string(ns, static_cast<size_t>(n)) : "");
}

// The machine, whatever network namespace: ranks with equal ids share its cores.
std::string detectMachineId() {
  const std::string id = detectHostId();
  const size_t ns = id.find("/net:");
  return ns == std::string::npos ? id : id.substr(0, ns);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, sep)) out.push_back(item);
  return out;
}

bool isPow2(size_t v) { return v && !(v & (v - 1)); }

}  // namespace

Mesh::Mesh(const MeshOptions& o) : opts_(o) {
  DTRAIN_CHECK(o.size >= 1 && o.rank >= 0 && o.rank < o.size, kConfig, "rank ", o.rank,
               " is outside a world of size ", o.size, ": set RANK/WORLD_SIZE consistently");
  DTRAIN_CHECK(o.transport == "auto" || o.transport == "shm" || o.transport == "tcp", kConfig,
               "unknown transport '", o.transport, "': use auto, shm or tcp (DTRAIN_TRANSPORT)");
  DTRAIN_CHECK(isPow2(o.shmBytes) && o.shmBytes >= 4096, kConfig, "DTRAIN_SHM_BYTES=", o.shmBytes,
               " must be a power of two of at least 4096");
  logRank() = o.rank;
  hostId_ = o.hostId.empty() ? detectHostId() : o.hostId;
  pairs_.resize(o.size);
  local_.assign(o.size, false);
  host_.resize(o.size);
  for (int r = 0; r < o.size; ++r) host_[r] = r;
  localRanks_ = {o.rank};
  if (o.size == 1) return;

  if (o.rank == 0) {
    Socket l = o.storeFd >= 0 ? Socket(o.storeFd) : Socket::listen("", o.masterPort);
    server_ = std::make_unique<StoreServer>(std::move(l), o.token);
  }
  int storePort = server_ ? server_->port() : o.masterPort;
  store_ = std::make_unique<StoreClient>(o.masterAddr, storePort, o.token, o.timeout);

  // Peers reach us on the address of the interface that reaches the store.
  std::string myAddr = store_->localAddress();
  Socket listener = Socket::listen("", 0);
  std::ostringstream me;
  const std::string machine = detectMachineId();
  me << hostId_ << "|" << ::getpid() << "|" << myAddr << "|" << listener.localPort() << "|" << machine;
  store_->set("peer/" + std::to_string(o.rank), me.str());

  std::vector<std::string> addrs(o.size);
  std::vector<std::string> hostIds(o.size);
  machineRanks_ = 0;
  std::vector<int> ports(o.size), pids(o.size);
  for (int r = 0; r < o.size; ++r) {
    auto f = split(store_->get("peer/" + std::to_string(r), o.timeout), '|');
    DTRAIN_CHECK(f.size() == 5, kRendezvous, "malformed rendezvous record from rank ", r,
                 ": every rank must run the same dtrain build");
    machineRanks_ += f[4] == machine ? 1 : 0;
    hostIds[r] = f[0];
    for (int q = 0; q < r && o.transport != "tcp"; ++q)
      if (hostIds[q] == f[0]) {
        host_[r] = host_[q];
        break;
      }
    pids[r] = std::stoi(f[1]);
    addrs[r] = f[2];
    ports[r] = std::stoi(f[3]);
    local_[r] = r != o.rank && o.transport != "tcp" && f[0] == hostId_;
    if (local_[r]) localRanks_.push_back(r);
  }
  DTRAIN_CHECK(o.transport != "shm" || static_cast<int>(localRanks_.size()) == o.size, kConfig,
               "DTRAIN_TRANSPORT=shm needs every rank on one host, but only ", localRanks_.size(),
               " of ", o.size, " ranks share this host: use auto");
  std::sort(localRanks_.begin(), localRanks_.end());
  localRank_ = static_cast<int>(std::find(localRanks_.begin(), localRanks_.end(), o.rank) -
                                localRanks_.begin());

  // More ranks than cores on this machine (network namespaces share its cores): spinning would
  // steal the core a peer needs.
  spinLimit_ = machineRanks_ > cores() ? 64 : 20000;
  if (const char* s = std::getenv("DTRAIN_SPIN")) spinLimit_ = std::strtoull(s, nullptr, 10);

  // Names are private to this job: derived from the token, which only its ranks hold.
  // The leader rank is part of the name: with DTRAIN_TRANSPORT=tcp every rank is alone on its
  // "host" although the host ids match, and each needs a board of its own.
  const std::string seed = o.token + "|" + hostId_ + "|" + std::to_string(localRanks_[0]);
  Digest h = sha256(seed.data(), seed.size());
  std::string prefix = "/dtrain-" + toHex(h.data(), 10);
  // Every rank gets a board (also ranks alone on their host) so the code has one path.
  std::string boardName = prefix + "-board";
  if (localRanks_[0] == o.rank) {
    ::shm_unlink(boardName.c_str());  // a crashed earlier job with the same token
    board_ = Board(Segment::create(boardName, Board::bytesFor(o.size)), o.size);
    store_->set("board/" + std::to_string(o.rank), "1");
  } else {
    store_->get("board/" + std::to_string(localRanks_[0]), o.timeout);
    board_ = Board(Segment::open(boardName, Board::bytesFor(o.size)), o.size);
  }
  board_.slot(o.rank).pid.store(::getpid());

  if (localRanks_.size() > 1) connectShm(prefix, pids);
  connectTcp(addrs, ports, listener);

  store_->barrier("mesh", o.size, o.timeout);
  // Everyone has mapped what they need: drop the names so nothing outlives the job.
  board_.unlink();
  inbound_.unlink();
}

Mesh::Mesh(int rank, int size, std::vector<std::unique_ptr<Pair>> pairs, std::vector<int> hosts)
    : pairs_(std::move(pairs)), host_(std::move(hosts)) {
  opts_.rank = rank;
  opts_.size = size;
  local_.assign(size, false);
  if (host_.empty())
    for (int r = 0; r < size; ++r) host_.push_back(r);
  DTRAIN_CHECK(static_cast<int>(host_.size()) == size, kConfig, "loopback mesh: ", host_.size(),
               " host entries for ", size, " ranks");
  localRanks_ = {rank};
  spinLimit_ = 64;  // threads of one test share the cores
}

Mesh::~Mesh() = default;

void Mesh::connectShm(const std::string& prefix, const std::vector<int>& pids) {
  const size_t n = localRanks_.size();
  const size_t ringBytes = RingChannel::bytesFor(opts_.shmBytes);
  uint8_t nonce[6];
  randomBytes(nonce, sizeof(nonce));
  std::string mine = prefix + "-in" + std::to_string(opts_.rank) + "-" + toHex(nonce, sizeof(nonce));
  inbound_ = Segment::create(mine, n * ringBytes);
  store_->set("shm/" + std::to_string(opts_.rank), mine);
  outbound_.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    int peer = localRanks_[i];
    if (peer == opts_.rank) continue;
    std::string theirs = store_->get("shm/" + std::to_string(peer), opts_.timeout);
    outbound_.push_back(Segment::open(theirs, n * ringBytes));
    // In every segment, ring i carries bytes from localRanks_[i].
    uint8_t* outBase = outbound_.back().data() + localRank_ * ringBytes;
    uint8_t* inBase = inbound_.data() + i * ringBytes;
    RingChannel out(reinterpret_cast<RingHeader*>(outBase), outBase + sizeof(RingHeader), opts_.shmBytes);
    RingChannel in(reinterpret_cast<RingHeader*>(inBase), inBase + sizeof(RingHeader), opts_.shmBytes);
    pairs_[peer] = std::make_unique<ShmPair>(peer, pids[peer], out, in);
  }
}

void Mesh::connectTcp(const std::vector<std::string>& addrs, const std::vector<int>& ports,
                      Socket& listener) {
  // Lower ranks accept, higher ranks connect; each connection passes the token
  // handshake and then names its rank.
  int expected = 0;
  for (int r = 0; r < opts_.rank; ++r) expected += local_[r] ? 0 : 1;
  std::exception_ptr acceptError;
  std::vector<Socket> accepted(opts_.size);
  std::thread acceptor([&] {
    try {
      Deadline d = deadlineIn(opts_.timeout);
      for (int got = 0; got < expected;) {
        std::string from;
        Socket s = listener.accept(d, &from);
        DTRAIN_CHECK(s.valid() || Clock::now() < d, kTimeout, "rank ", opts_.rank, " waited ",
                     opts_.timeout, " s for ", expected - got,
                     " lower rank(s) to connect: a rank did not start or cannot reach this host");
        if (!s.valid()) continue;
        std::string why;
        int32_t peer = -1;
        if (authenticateAsServer(s, opts_.token, "data", d, &why)) {
          s.recvAll(&peer, 4, d, "a connecting rank");
          if (peer < 0 || peer >= opts_.rank || local_[peer] || accepted[peer].valid()) {
            logWarning("refused a data connection from ", from, " claiming rank ", peer);
            continue;
          }
          accepted[peer] = std::move(s);
          ++got;
        } else {
          logWarning("refused a data connection from ", from, ": ", why,
                     " (it does not hold this job's DTRAIN_JOB_TOKEN); the job goes on");
        }
      }
    } catch (...) {
      acceptError = std::current_exception();
    }
  });
  std::exception_ptr connectError;
  try {
    Deadline d = deadlineIn(opts_.timeout);
    for (int r = opts_.rank + 1; r < opts_.size; ++r) {
      if (local_[r]) continue;
      Socket s = Socket::connect(addrs[r], ports[r], d, "rank " + std::to_string(r));
      authenticateAsClient(s, opts_.token, "data", d);
      int32_t me = opts_.rank;
      s.sendAll(&me, 4, d, "a peer rank");
      pairs_[r] = std::make_unique<TcpPair>(r, std::move(s), opts_.tcpBytes);
    }
  } catch (...) {
    connectError = std::current_exception();
  }
  acceptor.join();
  if (connectError) std::rethrow_exception(connectError);
  if (acceptError) std::rethrow_exception(acceptError);
  for (int r = 0; r < opts_.rank; ++r)
    if (accepted[r].valid()) pairs_[r] = std::make_unique<TcpPair>(r, std::move(accepted[r]), opts_.tcpBytes);
}

int Mesh::cores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

int Mesh::refusedConnections() const { return server_ ? server_->refused() : 0; }

void Mesh::breakWith(const std::string& reason) {
  // Held until the store has answered, and taken before anyone can see the mesh broken: a
  // thread that fails because of this break reads earlierFailure() only once it is known.
  std::unique_lock<std::mutex> report(reportMu_, std::defer_lock);
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!broken_.empty()) return;
    broken_ = reason;
    report.lock();
  }
  if (board_.valid()) board_.abort(opts_.rank, reason);
  // Before our connections close (which is all a remote rank sees): the first rank to fail
  // posts why; the others read it. A dead or stuck store costs at most a couple of seconds.
  if (store_) {
    std::string earlier;
    try {
      if (store_->add("abort/count", 1, 1.0) == 1)
        store_->set("abort/first", "rank " + std::to_string(opts_.rank) + ": " + reason, 1.0);
      else
        earlier = store_->get("abort/first", 1.0);
    } catch (const Error&) {
    }
    earlier_ = earlier;
  }
  report.unlock();
  // Remote peers learn from the closed connection.
  for (auto& p : pairs_)
    if (auto* t = dynamic_cast<TcpPair*>(p.get())) t->shutdown();
}

std::string Mesh::earlierFailure() const {
  std::lock_guard<std::mutex> g(reportMu_);
  return earlier_;
}

bool Mesh::broken(std::string* why) const {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (broken_.empty()) return false;
    *why = broken_;
  }
  // Waits for the store's answer if the break is still being reported, so that every error
  // raised after a break (not only the first) says where the job failed first.
  const std::string earlier = earlierFailure();
  if (!earlier.empty()) *why += "; the job had already failed at " + earlier;
  return true;
}

}  // namespace dtrain

#include "transport/store.h"

#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "common/log.h"

namespace dtrain {
namespace {

enum Op : uint8_t { kSet = 1, kGet = 2, kAdd = 3 };
enum Status : uint8_t { kOk = 0, kMissing = 1 };

constexpr uint32_t kMaxKey = 4096;
constexpr uint64_t kMaxValue = 64u << 20;

// Request: u8 op, u32 key length, key, u64 value length, value.
// Reply:   u8 status, u64 value length, value.
void sendFrame(const Socket& s, uint8_t head, const std::string* key, const std::string& value,
               Deadline d, const char* what) {
  std::string buf;
  buf.push_back(static_cast<char>(head));
  if (key) {
    uint32_t kl = static_cast<uint32_t>(key->size());
    buf.append(reinterpret_cast<const char*>(&kl), 4);
    buf.append(*key);
  }
  uint64_t vl = value.size();
  buf.append(reinterpret_cast<const char*>(&vl), 8);
  buf.append(value);
  s.sendAll(buf.data(), buf.size(), d, what);
}

}  // namespace

StoreServer::StoreServer(Socket listener, std::string token)
    : listener_(std::move(listener)), token_(std::move(token)), port_(listener_.localPort()) {
  acceptor_ = std::thread([this] { acceptLoop(); });
}

StoreServer::~StoreServer() {
  stop_ = true;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (int fd : clients_) ::shutdown(fd, SHUT_RDWR);
    cv_.notify_all();
  }
  if (acceptor_.joinable()) acceptor_.join();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void StoreServer::acceptLoop() {
  while (!stop_) {
    std::string peer;
    Socket s = listener_.accept(deadlineIn(0.2), &peer);
    if (!s.valid()) continue;
    int fd = s.release();
    std::lock_guard<std::mutex> g(mu_);
    clients_.push_back(fd);
    threads_.emplace_back([this, fd, peer] { serve(fd, peer); });
  }
}

void StoreServer::serve(int fd, std::string peer) {
  // Forget the fd before the socket closes it, so stop() never shuts down a reused number.
  struct Forget {
    StoreServer* self;
    int fd;
    ~Forget() {
      std::lock_guard<std::mutex> g(self->mu_);
      auto& c = self->clients_;
      c.erase(std::remove(c.begin(), c.end(), fd), c.end());
    }
  };
  Socket s(fd);
  Forget forget{this, fd};
  std::string why;
  if (!authenticateAsServer(s, token_, "store", deadlineIn(10.0), &why)) {
    ++refused_;
    logWarning("refused a rendezvous connection from ", peer, ": ", why,
               " (it does not hold this job's DTRAIN_JOB_TOKEN); the job goes on");
    return;
  }
  const Deadline forever = Clock::now() + std::chrono::hours(24 * 365);
  try {
    while (!stop_) {
      uint8_t op;
      uint32_t kl;
      uint64_t vl;
      s.recvAll(&op, 1, forever, "store client");
      s.recvAll(&kl, 4, forever, "store client");
      DTRAIN_CHECK(kl <= kMaxKey, kComm, "store key of ", kl, " bytes is too long");
      std::string key(kl, '\0');
      s.recvAll(key.data(), kl, forever, "store client");
      s.recvAll(&vl, 8, forever, "store client");
      DTRAIN_CHECK(vl <= kMaxValue, kComm, "store value of ", vl, " bytes is too large");
      std::string value(vl, '\0');
      s.recvAll(value.data(), vl, forever, "store client");

      std::string out;
      uint8_t status = kOk;
      if (op == kSet) {
        std::lock_guard<std::mutex> g(mu_);
        kv_[key] = value;
        cv_.notify_all();
      } else if (op == kAdd) {
        DTRAIN_CHECK(vl == 8, kComm, "malformed store add");
        int64_t delta;
        std::memcpy(&delta, value.data(), 8);
        std::lock_guard<std::mutex> g(mu_);
        int64_t cur = 0;
        auto it = kv_.find(key);
        if (it != kv_.end() && it->second.size() == 8) std::memcpy(&cur, it->second.data(), 8);
        cur += delta;
        std::string enc(reinterpret_cast<const char*>(&cur), 8);
        kv_[key] = enc;
        out = enc;
        cv_.notify_all();
      } else if (op == kGet) {
        DTRAIN_CHECK(vl == 8, kComm, "malformed store get");
        double wait;
        std::memcpy(&wait, value.data(), 8);
        std::unique_lock<std::mutex> g(mu_);
        bool found = cv_.wait_for(g, std::chrono::duration<double>(wait),
                                  [&] { return stop_ || kv_.count(key) > 0; });
        if (found && kv_.count(key)) out = kv_[key];
        else status = kMissing;
      } else {
        DTRAIN_THROW(kComm, "unknown store request ", int(op));
      }
      sendFrame(s, status, nullptr, out, forever, "store client");
    }
  } catch (const Error&) {
    // The client went away (a finished or dead rank): nothing to clean up but the socket.
  }
}

StoreClient::StoreClient(const std::string& host, int port, std::string token, double timeout)
    : token_(std::move(token)), timeout_(timeout), where_(host + ":" + std::to_string(port)) {
  Deadline d = deadlineIn(timeout);
  sock_ = Socket::connect(host, port, d, "the rendezvous store (rank 0)");
  sock_.setNoDelay();
  authenticateAsClient(sock_, token_, "store", d);
}

std::string StoreClient::request(uint8_t op, const std::string& key, const std::string& value,
                                 double timeout) {
  std::lock_guard<std::mutex> g(mu_);
  Deadline d = deadlineIn(timeout + 5.0);
  const std::string what = "the rendezvous store at " + where_;
  sendFrame(sock_, op, &key, value, d, what.c_str());
  uint8_t status;
  uint64_t vl;
  sock_.recvAll(&status, 1, d, what.c_str());
  sock_.recvAll(&vl, 8, d, what.c_str());
  DTRAIN_CHECK(vl <= kMaxValue, kRendezvous, "malformed reply from ", what);
  std::string out(vl, '\0');
  sock_.recvAll(out.data(), vl, d, what.c_str());
  DTRAIN_CHECK(status == kOk, kTimeout, "rendezvous timed out after ", timeout,
               " s waiting for key '", key, "' from ", what,
               ": a rank did not start or did not reach the same point; check every rank's log");
  return out;
}

void StoreClient::set(const std::string& key, const std::string& value, double timeout) {
  request(kSet, key, value, timeout < 0 ? timeout_ : timeout);
}

std::string StoreClient::get(const std::string& key, double timeout) {
  std::string wait(reinterpret_cast<const char*>(&timeout), 8);
  return request(kGet, key, wait, timeout);
}

int64_t StoreClient::add(const std::string& key, int64_t delta, double timeout) {
  std::string v(reinterpret_cast<const char*>(&delta), 8);
  std::string out = request(kAdd, key, v, timeout < 0 ? timeout_ : timeout);
  int64_t r;
  std::memcpy(&r, out.data(), 8);
  return r;
}

void StoreClient::barrier(const std::string& name, int n, double timeout) {
  if (add("barrier/" + name, 1) == n) set("barrier/" + name + "/go", "1");
  get("barrier/" + name + "/go", timeout);
}

}  // namespace dtrain

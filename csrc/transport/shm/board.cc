#include "transport/shm/board.h"

#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/error.h"

namespace dtrain {

Board::Board(Segment seg, int world) : seg_(std::move(seg)), world_(world) {
  hdr_ = reinterpret_cast<BoardHeader*>(seg_.data());
  slots_ = reinterpret_cast<BoardSlot*>(seg_.data() + sizeof(BoardHeader));
}

BoardSlot& Board::slot(int rank) const { return slots_[rank]; }

void Board::enter(int rank, uint32_t group, int gslot, uint64_t seq) {
  BoardSlot& s = slots_[rank];
  s.group[gslot].store(group, std::memory_order_relaxed);
  s.entered[gslot].store(seq, std::memory_order_release);
}

int64_t Board::lastEntered(int rank, uint32_t group, int gslot) const {
  const BoardSlot& s = slots_[rank];
  if (s.group[gslot].load(std::memory_order_acquire) != group) return 0;
  return static_cast<int64_t>(s.entered[gslot].load(std::memory_order_acquire));
}

void Board::abort(int rank, const std::string& reason) {
  if (!hdr_) return;
  uint32_t expected = 0;
  if (hdr_->aborted.compare_exchange_strong(expected, 1)) {
    std::snprintf(hdr_->reason, sizeof(hdr_->reason), "%s", reason.c_str());
    hdr_->abortRank.store(rank, std::memory_order_relaxed);
    hdr_->aborted.store(2, std::memory_order_release);  // reason is complete
  }
}

bool Board::aborted(int* rank, std::string* reason) const {
  if (!hdr_ || hdr_->aborted.load(std::memory_order_acquire) != 2) return false;
  *rank = hdr_->abortRank.load(std::memory_order_relaxed);
  *reason = hdr_->reason;
  return true;
}

bool processAlive(int pid) {
  if (pid <= 0) return true;  // unknown: let the timeout decide
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%d/stat", pid);
  FILE* f = std::fopen(path, "r");
  if (!f) return false;
  char buf[256] = {0};
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  const char* close = static_cast<const char*>(std::memchr(buf, ')', n));
  // The state letter follows "pid (comm) "; Z and X mean the process has exited.
  if (close && close + 2 < buf + n) return close[2] != 'Z' && close[2] != 'X';
  return true;
}

}  // namespace dtrain

// The host board: one shared page per host and job, mapped by every local rank.
// It answers the questions a waiting rank must be able to answer in seconds:
// has someone aborted (and why), which ranks have reached this collective, and
// is a given local rank still alive.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/shm/segment.h"

namespace dtrain {

constexpr int kGroupSlots = 16;  // groups tracked per rank for "who has arrived"

struct BoardSlot {
  std::atomic<int32_t> pid;
  std::atomic<uint32_t> group[kGroupSlots];    // group id tracked in this slot
  std::atomic<uint64_t> entered[kGroupSlots];  // last collective number entered in that group
};

struct BoardHeader {
  std::atomic<uint32_t> aborted;
  std::atomic<int32_t> abortRank;
  char reason[1024];
};

class Board {
 public:
  Board() = default;
  Board(Segment seg, int world);

  static size_t bytesFor(int world) { return sizeof(BoardHeader) + sizeof(BoardSlot) * world; }

  BoardSlot& slot(int rank) const;
  void enter(int rank, uint32_t group, int gslot, uint64_t seq);
  // Returns the seq rank `r` last entered in `group`, or -1 if unknown.
  int64_t lastEntered(int rank, uint32_t group, int gslot) const;

  // The first caller records its rank and reason; later calls keep the first.
  void abort(int rank, const std::string& reason);
  bool aborted(int* rank, std::string* reason) const;

  void unlink() { seg_.unlink(); }
  bool valid() const { return seg_.data() != nullptr; }

 private:
  Segment seg_;
  BoardHeader* hdr_ = nullptr;
  BoardSlot* slots_ = nullptr;
  int world_ = 0;
};

// True while process `pid` exists and is not a zombie.
bool processAlive(int pid);

}  // namespace dtrain

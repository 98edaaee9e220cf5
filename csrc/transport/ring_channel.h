// A single-producer single-consumer byte ring in memory that both sides map:
// a shared-memory segment between processes, or the heap between threads for
// the loopback fake. The producer owns `head`, the consumer owns `tail`; each
// caches the other's counter so the shared cache lines move only when needed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain {

struct alignas(64) RingHeader {
  alignas(64) std::atomic<uint64_t> head;  // bytes ever written (producer)
  alignas(64) std::atomic<uint64_t> tail;  // bytes ever consumed (consumer)
};

static_assert(std::atomic<uint64_t>::is_always_lock_free,
              "shared-memory rings need lock-free 64-bit atomics");

// Capacity must be a power of two and a multiple of 64. Streams start 8-byte
// aligned (each is padded), but inside a stream positions are only aligned to
// its element size, so a stale cached counter can show a few bytes that hold
// no whole element of the next stream: both sides re-read the shared counter
// whenever the cached view offers less than kRefresh bytes, never only at zero.
class RingChannel {
 public:
  static constexpr uint64_t kRefresh = 64;

  RingChannel() = default;
  RingChannel(RingHeader* hdr, uint8_t* data, size_t cap) : hdr_(hdr), data_(data), cap_(cap) {}

  static size_t bytesFor(size_t cap) { return sizeof(RingHeader) + cap; }

  // Producer side: contiguous writable span.
  size_t writable(uint8_t** out) {
    uint64_t head = hdr_->head.load(std::memory_order_relaxed);
    uint64_t space = cap_ - (head - cachedTail_);
    if (space < kRefresh) {
      cachedTail_ = hdr_->tail.load(std::memory_order_acquire);
      space = cap_ - (head - cachedTail_);
      if (space == 0) return 0;
    }
    size_t off = head & (cap_ - 1);
    size_t contig = cap_ - off;
    *out = data_ + off;
    return space < contig ? space : contig;
  }
  void commit(size_t n) {
    hdr_->head.store(hdr_->head.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }

  // Consumer side: contiguous readable span.
  size_t readable(const uint8_t** out) {
    uint64_t tail = hdr_->tail.load(std::memory_order_relaxed);
    uint64_t avail = cachedHead_ - tail;
    if (avail < kRefresh) {
      cachedHead_ = hdr_->head.load(std::memory_order_acquire);
      avail = cachedHead_ - tail;
      if (avail == 0) return 0;
    }
    size_t off = tail & (cap_ - 1);
    size_t contig = cap_ - off;
    *out = data_ + off;
    return avail < contig ? avail : contig;
  }
  void consume(size_t n) {
    hdr_->tail.store(hdr_->tail.load(std::memory_order_relaxed) + n, std::memory_order_release);
  }

  size_t capacity() const { return cap_; }
  std::string debugState() const {
    return "head=" + std::to_string(hdr_->head.load()) + " tail=" + std::to_string(hdr_->tail.load()) +
           " cachedHead=" + std::to_string(cachedHead_) + " cachedTail=" + std::to_string(cachedTail_);
  }

 private:
  RingHeader* hdr_ = nullptr;
  uint8_t* data_ = nullptr;
  size_t cap_ = 0;
  uint64_t cachedTail_ = 0;  // producer's view of tail
  uint64_t cachedHead_ = 0;  // consumer's view of head
};

}  // namespace dtrain

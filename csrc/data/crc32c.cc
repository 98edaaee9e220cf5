#include "data/crc32c.h"

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define DTRAIN_CRC_X86 1
#endif

namespace dtrain {
namespace data {

namespace {

constexpr uint32_t kPoly = 0x82f63b78u;  // Castagnoli, reflected

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

uint32_t crcTable(const uint8_t* p, size_t n, uint32_t crc) {
  const Tables& T = tables();
  crc = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    crc = (crc >> 8) ^ T.t[0][(crc ^ *p++) & 0xff];
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian hosts only (x86, arm64): TFRecord is little-endian too
    w ^= crc;
    crc = T.t[7][w & 0xff] ^ T.t[6][(w >> 8) & 0xff] ^ T.t[5][(w >> 16) & 0xff] ^ T.t[4][(w >> 24) & 0xff] ^
          T.t[3][(w >> 32) & 0xff] ^ T.t[2][(w >> 40) & 0xff] ^ T.t[1][(w >> 48) & 0xff] ^ T.t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ T.t[0][(crc ^ *p++) & 0xff];
  return ~crc;
}

#ifdef DTRAIN_CRC_X86
// Advancing a raw CRC register over k zero bytes is linear in the register, so it is
// four table lookups (one per register byte). Three streams over adjacent lanes of a
// block are then joined: crc(A B C) = zeros(|B C|, crc(A)) ^ zeros(|C|, crc(B)) ^ crc(C).
struct Shift {
  uint32_t t[4][256];
  explicit Shift(size_t k) {
    const Tables& T = tables();
    uint32_t bit[32];
    for (int i = 0; i < 32; ++i) {
      uint32_t c = 1u << i;
      for (size_t j = 0; j < k; ++j) c = (c >> 8) ^ T.t[0][c & 0xff];
      bit[i] = c;
    }
    for (int b = 0; b < 4; ++b)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t c = 0;
        for (int i = 0; i < 8; ++i)
          if (v >> i & 1) c ^= bit[8 * b + i];
        t[b][v] = c;
      }
  }
  uint32_t operator()(uint32_t c) const {
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
  }
};

template <size_t kLane>
struct Lanes {
  Shift one{kLane}, two{2 * kLane};
};

template <size_t kLane>
__attribute__((target("sse4.2"))) uint64_t crcHw3(const uint8_t*& p, size_t& n, uint64_t c) {
  static const Lanes<kLane> L;
  // The crc32 instruction takes 3 cycles but issues every cycle: three independent
  // streams run about three times as fast as one.
  while (n >= 3 * kLane) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < kLane; i += 8) {
      uint64_t a, b, d;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + kLane + i, 8);
      std::memcpy(&d, p + 2 * kLane + i, 8);
      c = _mm_crc32_u64(c, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
    }
    c = L.two(static_cast<uint32_t>(c)) ^ L.one(static_cast<uint32_t>(c1)) ^ static_cast<uint32_t>(c2);
    p += 3 * kLane;
    n -= 3 * kLane;
  }
  return c;
}

__attribute__((target("sse4.2"))) uint32_t crcHw(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = static_cast<uint32_t>(~crc);
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  c = crcHw3<1024>(p, n, c);
  c = crcHw3<128>(p, n, c);
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  while (n--) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}

bool cpuHasSse42() { return __builtin_cpu_supports("sse4.2"); }
#endif

using Fn = uint32_t (*)(const uint8_t*, size_t, uint32_t);

Fn pick(bool wantHw) {
#ifdef DTRAIN_CRC_X86
  if (wantHw && cpuHasSse42()) return crcHw;
#endif
  (void)wantHw;
  return crcTable;
}

Fn& current() {
  static Fn f = pick(true);
  return f;
}

}  // namespace

uint32_t crc32c(const void* p, size_t n, uint32_t crc) {
  return current()(static_cast<const uint8_t*>(p), n, crc);
}

const char* crc32cImpl() { return current() == crcTable ? "table" : "sse4.2"; }

bool setCrc32cHardware(bool hw) {
  current() = pick(hw);
  return !hw || current() != crcTable;
}

}  // namespace data
}  // namespace dtrain

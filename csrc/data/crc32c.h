// CRC-32C (Castagnoli), as TFRecord frames use it: the SSE4.2 instruction where the
// CPU has it (checked once at run time), slicing-by-8 tables elsewhere.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain {
namespace data {

// CRC-32C of `n` bytes, continuing from `crc` (0 to start).
uint32_t crc32c(const void* p, size_t n, uint32_t crc = 0);

// TFRecord's masking, so a CRC stored in the data does not checksum to itself.
inline uint32_t maskCrc(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xa282ead8u; }
inline uint32_t unmaskCrc(uint32_t m) {
  uint32_t r = m - 0xa282ead8u;
  return (r >> 17) | (r << 15);
}

// "sse4.2" or "table": which implementation crc32c() runs.
const char* crc32cImpl();
// Forces the portable path (tests compare both); returns false if `hw` was asked but is missing.
bool setCrc32cHardware(bool hw);

}  // namespace data
}  // namespace dtrain

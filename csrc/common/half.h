// Scalar IEEE binary16 and bfloat16 conversions (round to nearest even).
//
// The vector kernels use hardware conversion where the CPU has it; these are
// the portable reference and the tail loops, and must agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

namespace dtrain {

inline uint32_t floatBits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bitsFloat(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16ToFloat(uint16_t h) { return bitsFloat(static_cast<uint32_t>(h) << 16); }

inline uint16_t floatToBf16(float f) {
  uint32_t u = floatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float halfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bitsFloat(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {
    if (man == 0) return bitsFloat(sign);
    // Subnormal: value = man * 2^-24.
    float v = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bitsFloat(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t floatToHalf(float f) {
  uint32_t u = floatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;                  // NaN
  if (u >= 0x477ff000u) return sign | 0x7c00u;                 // rounds to >= 65520: inf
  if (u < 0x38800000u) {                                       // below the smallest normal
    // Scale into the subnormal grid with the FPU doing the rounding.
    float v = bitsFloat(u) * 16777216.0f;                      // * 2^24
    uint32_t m = static_cast<uint32_t>(__builtin_nearbyintf(v));
    return sign | static_cast<uint16_t>(m);
  }
  uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xc8000fffu + mant_odd;                                 // rebias exponent (-112 << 23) and round
  return sign | static_cast<uint16_t>(u >> 13);
}

}  // namespace dtrain

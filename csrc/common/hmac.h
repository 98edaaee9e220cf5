// SHA-256 and HMAC-SHA256 (FIPS 180-4, RFC 2104) for the job-token handshake.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain {

using Digest = std::array<uint8_t, 32>;

Digest sha256(const void* data, size_t len);
Digest hmacSha256(const std::string& key, const void* data, size_t len);

// Constant-time comparison.
bool digestEqual(const uint8_t* a, const uint8_t* b, size_t n);

// Fills `buf` from the kernel's CSPRNG.
void randomBytes(void* buf, size_t n);

std::string toHex(const uint8_t* p, size_t n);

}  // namespace dtrain

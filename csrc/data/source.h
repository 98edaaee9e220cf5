// Byte sources under the TFRecord framing: a plain file, or a zlib/gzip stream
// inflated on the fly. Positions are in the uncompressed stream, which is what
// record offsets (and index files) count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dtrain {
namespace data {

enum class Compression { kNone, kZlib, kGzip };

Compression parseCompression(const std::string& s);  // "", "none", "zlib", "gzip" (DataError otherwise)
const char* compressionName(Compression c);

class Source {
 public:
  virtual ~Source() = default;
  // Reads up to n bytes; returns 0 only at the end of the stream. Throws DataError.
  virtual size_t read(uint8_t* dst, size_t n) = 0;
  // Moves to an uncompressed offset (plain files only; compressed streams throw).
  virtual void seek(uint64_t offset) = 0;
  virtual bool seekable() const = 0;
  // Total uncompressed size if known (plain files), else UINT64_MAX.
  virtual uint64_t size() const = 0;
};

// Opens `path` (DataError naming it when it cannot). `readBytes` is the size of
// each read() from the file.
std::unique_ptr<Source> openSource(const std::string& path, Compression c, size_t readBytes = 1 << 20);

}  // namespace data
}  // namespace dtrain

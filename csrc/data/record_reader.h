// TFRecord framing: uint64 length, masked CRC-32C of the length, the data, masked
// CRC-32C of the data (all little-endian). The reader checks the length's CRC
// before it trusts (or allocates for) the length.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/buffer.h"
#include "data/source.h"

namespace dtrain {
namespace data {

enum class OnError { kRaise, kSkip };

struct ReaderStats {
  uint64_t records = 0;      // good records returned
  uint64_t bytes = 0;        // their payload bytes
  uint64_t badRecords = 0;   // skipped records (on_error="skip")
  uint64_t skippedBytes = 0; // bytes passed over while skipping
};

struct Record {
  const uint8_t* data = nullptr;  // valid until the next call to next(), or while buffer() is held
  uint64_t size = 0;
  uint64_t offset = 0;  // of the record's header in the (uncompressed) stream
};

class RecordReader {
 public:
  RecordReader(const std::string& path, Compression c, OnError onError = OnError::kRaise, bool verify = true,
               size_t bufferBytes = 1 << 20);

  // The next record, or false at the end. A bad record throws DataError naming the
  // file and offset, or (kSkip) is counted and passed over.
  bool next(Record& r);
  // Continues at `offset` (a record boundary; plain files only).
  void seek(uint64_t offset);

  const ReaderStats& stats() const { return stats_; }
  const std::string& path() const { return path_; }
  // The buffer the last record lies in. While a caller holds it, the reader leaves it
  // alone and continues in a fresh one, so records can be used without a copy.
  const std::shared_ptr<Buffer>& buffer() const { return buf_; }
  // Where fresh buffers come from (a pool, so memory is reused rather than faulted in anew).
  using BufferSource = std::function<std::shared_ptr<Buffer>(size_t minBytes)>;
  void setBufferSource(BufferSource source) { source_ = std::move(source); }
  // Messages of the records skipped so far (at most 100 kept).
  const std::vector<std::string>& problems() const { return problems_; }

 private:
  // Makes at least n bytes available from head_ (fewer only at the end); returns how many are.
  size_t fill(size_t n);
  // Reports a bad record at `offset`; returns normally only under kSkip.
  void bad(uint64_t offset, const std::string& what);
  // After a header whose CRC failed: the next offset where a valid header starts.
  bool resync();

  std::string path_;
  std::unique_ptr<Source> src_;
  OnError onError_;
  bool verify_;
  std::shared_ptr<Buffer> buf_;
  BufferSource source_;
  size_t head_ = 0, tail_ = 0;  // unread bytes are buf_[head_, tail_)
  uint64_t pos_ = 0;            // stream offset of buf_[head_]
  bool eof_ = false;
  ReaderStats stats_;
  std::vector<std::string> problems_;
};

// Writes framed records, optionally through zlib/gzip. Writes go to `path`.tmp-<pid>
// first and are renamed onto `path` by close(), so a crash never leaves a half file
// under the real name.
class RecordWriter {
 public:
  RecordWriter(const std::string& path, Compression c, int level = -1);
  ~RecordWriter();
  void write(const uint8_t* data, size_t n);
  void flush();
  void close();
  uint64_t records() const { return records_; }
  uint64_t offset() const { return offset_; }  // uncompressed bytes written so far

 private:
  void put(const uint8_t* p, size_t n);
  void drain(int flush);

  std::string path_, tmp_;
  Compression c_;
  int fd_ = -1;
  void* z_ = nullptr;  // z_stream when compressing
  std::vector<uint8_t> out_;
  std::vector<uint8_t> staged_;
  uint64_t records_ = 0, offset_ = 0;
  bool closed_ = false;
};

}  // namespace data
}  // namespace dtrain

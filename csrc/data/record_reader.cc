#include "data/record_reader.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "common/error.h"
#include "data/crc32c.h"

namespace dtrain {
namespace data {

namespace {

constexpr size_t kHeader = 12;
constexpr size_t kFooter = 4;
// A length past this is taken for corruption even when its CRC holds (it could not be
// allocated sensibly anyway); TensorFlow's own limit is lower in practice.
constexpr uint64_t kMaxRecord = uint64_t(1) << 32;

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace

RecordReader::RecordReader(const std::string& path, Compression c, OnError onError, bool verify,
                           size_t bufferBytes)
    : path_(path), src_(openSource(path, c, bufferBytes)), onError_(onError), verify_(verify),
      buf_(std::make_shared<Buffer>(std::max<size_t>(bufferBytes, 64))) {}

size_t RecordReader::fill(size_t n) {
  size_t avail = tail_ - head_;
  if (avail >= n || eof_) return avail;
  if (buf_->size() - head_ < n) {  // slide what is left to the front, grow for a large record
    if (buf_.use_count() > 1) {  // records in this buffer are in use: continue in a fresh one
      const size_t want = std::max(n, buf_->size());
      std::shared_ptr<Buffer> fresh = source_ ? source_(want) : std::make_shared<Buffer>(want);
      std::memcpy(fresh->data(), buf_->data() + head_, avail);
      buf_ = std::move(fresh);
    } else {
      std::memmove(buf_->data(), buf_->data() + head_, avail);
      if (buf_->size() < n) buf_->resize(std::max(n, buf_->size() * 2));
    }
    head_ = 0;
    tail_ = avail;
  }
  while (tail_ - head_ < n && !eof_) {
    size_t k = src_->read(buf_->data() + tail_, buf_->size() - tail_);
    if (k == 0) eof_ = true;
    tail_ += k;
  }
  return tail_ - head_;
}

void RecordReader::bad(uint64_t offset, const std::string& what) {
  std::string where = src_->seekable() ? "byte offset " : "byte offset (of the decompressed stream) ";
  std::string msg = path_ + ": bad record at " + where + std::to_string(offset) + ": " + what;
  if (onError_ == OnError::kRaise)
    DTRAIN_THROW(kData, msg, "; the file is damaged: re-create it, or read with on_error='skip' to pass over "
                 "bad records (`dtrain-data check` lists them all)");
  ++stats_.badRecords;
  if (problems_.size() < 100) problems_.push_back(msg);
}

bool RecordReader::resync() {
  const uint64_t size = src_->size();
  for (;;) {
    ++head_;
    ++pos_;
    ++stats_.skippedBytes;
    size_t have = fill(kHeader);
    if (have < kHeader) {
      stats_.skippedBytes += have;
      pos_ += have;
      head_ = tail_;
      return false;
    }
    const uint8_t* p = buf_->data() + head_;
    uint64_t len = load64(p);
    if (crc32c(p, 8) != unmaskCrc(load32(p + 8)) || len > kMaxRecord) continue;
    if (size != UINT64_MAX && len + kHeader + kFooter > size - pos_) continue;
    return true;
  }
}

bool RecordReader::next(Record& r) {
  const uint64_t size = src_->size();
  for (;;) {
    size_t have = fill(kHeader);
    if (have == 0) return false;
    const uint64_t off = pos_;
    if (have < kHeader) {
      bad(off, "truncated header: the file ends " + std::to_string(have) + " bytes into a 12-byte record header");
      stats_.skippedBytes += have;
      pos_ += have;
      head_ = tail_;
      return false;
    }
    const uint8_t* p = buf_->data() + head_;
    const uint64_t len = load64(p);
    if (verify_ && crc32c(p, 8) != unmaskCrc(load32(p + 8))) {
      char hex[32];
      std::snprintf(hex, sizeof(hex), "0x%016llx", static_cast<unsigned long long>(len));
      bad(off, std::string("the length field's CRC does not match (length bytes read as ") + hex +
                   "), so the length cannot be trusted");
      if (!resync()) return false;
      continue;
    }
    if (len > kMaxRecord) {
      bad(off, "record length " + std::to_string(len) + " is over the 4 GiB limit");
      if (!resync()) return false;
      continue;
    }
    const uint64_t need = kHeader + len + kFooter;
    if (size != UINT64_MAX && need > size - off) {
      bad(off, "the header says " + std::to_string(len) + " data bytes but only " +
                   std::to_string(size - off > kHeader ? size - off - kHeader : 0) +
                   " bytes are left in the file (a truncated last record)");
      stats_.skippedBytes += size - off;
      pos_ = size;
      head_ = tail_;
      eof_ = true;
      return false;
    }
    have = fill(need);
    if (have < need) {
      bad(off, "the header says " + std::to_string(len) + " data bytes but the stream ends after " +
                   std::to_string(have - kHeader) + " (a truncated last record)");
      stats_.skippedBytes += have;
      pos_ += have;
      head_ = tail_;
      return false;
    }
    p = buf_->data() + head_;
    const uint8_t* data = p + kHeader;
    if (verify_ && crc32c(data, len) != unmaskCrc(load32(data + len))) {
      bad(off, "the data CRC does not match (" + std::to_string(len) + " data bytes): the payload is damaged");
      stats_.skippedBytes += need;
      head_ += need;
      pos_ += need;
      continue;
    }
    r.data = data;
    r.size = len;
    r.offset = off;
    head_ += need;
    pos_ += need;
    ++stats_.records;
    stats_.bytes += len;
    return true;
  }
}

void RecordReader::seek(uint64_t offset) {
  src_->seek(offset);
  head_ = tail_ = 0;
  pos_ = offset;
  eof_ = false;
}

// ------------------------------------------------------------------ writer

RecordWriter::RecordWriter(const std::string& path, Compression c, int level) : path_(path), c_(c) {
  tmp_ = path + ".tmp-" + std::to_string(::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DTRAIN_CHECK(fd_ >= 0, kData, "cannot create '", tmp_, "' (to write '", path, "'): ", std::strerror(errno));
  out_.resize(1 << 20);
  if (c != Compression::kNone) {
    auto* z = new z_stream;
    std::memset(z, 0, sizeof(*z));
    int bits = c == Compression::kGzip ? 15 + 16 : 15;
    int rc = deflateInit2(z, level, Z_DEFLATED, bits, 8, Z_DEFAULT_STRATEGY);
    if (rc != Z_OK) {
      delete z;
      ::close(fd_);
      ::unlink(tmp_.c_str());
      DTRAIN_THROW(kConfig, "zlib rejected compression level ", level, " (use -1 for the default, or 0..9)");
    }
    z_ = z;
  }
}

RecordWriter::~RecordWriter() {
  if (!closed_) {  // never closed: discard, so no half-written file appears under the real name
    if (z_) {
      deflateEnd(static_cast<z_stream*>(z_));
      delete static_cast<z_stream*>(z_);
    }
    if (fd_ >= 0) ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void RecordWriter::write(const uint8_t* data, size_t n) {
  DTRAIN_CHECK(!closed_, kConfig, "write() on a closed TFRecordWriter for '", path_, "'");
  uint8_t head[kHeader];
  uint64_t len = n;
  std::memcpy(head, &len, 8);
  uint32_t c = maskCrc(crc32c(head, 8));
  std::memcpy(head + 8, &c, 4);
  uint32_t d = maskCrc(crc32c(data, n));
  put(head, kHeader);
  put(data, n);
  put(reinterpret_cast<const uint8_t*>(&d), 4);
  ++records_;
  offset_ += kHeader + n + kFooter;
}

void RecordWriter::put(const uint8_t* p, size_t n) {
  if (!z_) {
    staged_.insert(staged_.end(), p, p + n);
    if (staged_.size() >= (1 << 20)) flush();
    return;
  }
  auto* z = static_cast<z_stream*>(z_);
  z->next_in = const_cast<uint8_t*>(p);
  z->avail_in = static_cast<uInt>(n);
  while (z->avail_in > 0) drain(Z_NO_FLUSH);
}

static void writeAll(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n) {
    ssize_t k = ::write(fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    DTRAIN_CHECK(k > 0, kData, "writing '", path, "' failed: ", std::strerror(errno));
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void RecordWriter::drain(int flush) {
  auto* z = static_cast<z_stream*>(z_);
  z->next_out = out_.data();
  z->avail_out = static_cast<uInt>(out_.size());
  int rc = deflate(z, flush);
  DTRAIN_CHECK(rc != Z_STREAM_ERROR, kData, "zlib failed compressing '", path_, "'");
  writeAll(fd_, out_.data(), out_.size() - z->avail_out, tmp_);
}

void RecordWriter::flush() {
  if (closed_) return;
  if (!z_) {
    writeAll(fd_, staged_.data(), staged_.size(), tmp_);
    staged_.clear();
  }
}

void RecordWriter::close() {
  if (closed_) return;
  if (z_) {
    auto* z = static_cast<z_stream*>(z_);
    z->next_in = nullptr;
    z->avail_in = 0;
    for (;;) {
      z->next_out = out_.data();
      z->avail_out = static_cast<uInt>(out_.size());
      int rc = deflate(z, Z_FINISH);
      writeAll(fd_, out_.data(), out_.size() - z->avail_out, tmp_);
      if (rc == Z_STREAM_END) break;
      DTRAIN_CHECK(rc == Z_OK || rc == Z_BUF_ERROR, kData, "zlib failed finishing '", path_, "'");
    }
    deflateEnd(z);
    delete z;
    z_ = nullptr;
  } else {
    flush();
  }
  DTRAIN_CHECK(::fsync(fd_) == 0, kData, "fsync of '", tmp_, "' failed: ", std::strerror(errno));
  ::close(fd_);
  fd_ = -1;
  DTRAIN_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, kData, "renaming '", tmp_, "' to '", path_,
               "' failed: ", std::strerror(errno));
  closed_ = true;
}

}  // namespace data
}  // namespace dtrain

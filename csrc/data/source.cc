#include "data/source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace dtrain {
namespace data {

Compression parseCompression(const std::string& s) {
  if (s.empty() || s == "none" || s == "None") return Compression::kNone;
  if (s == "zlib" || s == "ZLIB") return Compression::kZlib;
  if (s == "gzip" || s == "GZIP") return Compression::kGzip;
  DTRAIN_THROW(kConfig, "compression '", s, "' is not known: use None, 'gzip' or 'zlib'");
}

const char* compressionName(Compression c) {
  switch (c) {
    case Compression::kNone: return "none";
    case Compression::kZlib: return "zlib";
    case Compression::kGzip: return "gzip";
  }
  return "?";
}

namespace {

class FileSource : public Source {
 public:
  FileSource(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    DTRAIN_CHECK(fd_ >= 0, kData, "cannot open '", path, "': ", std::strerror(errno));
    struct stat st;
    DTRAIN_CHECK(::fstat(fd_, &st) == 0, kData, "cannot stat '", path, "': ", std::strerror(errno));
    DTRAIN_CHECK(!S_ISDIR(st.st_mode), kData, "'", path, "' is a directory, not a TFRecord file");
    size_ = static_cast<uint64_t>(st.st_size);
#ifdef POSIX_FADV_SEQUENTIAL
    ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
  }
  ~FileSource() override {
    if (fd_ >= 0) ::close(fd_);
  }
  size_t read(uint8_t* dst, size_t n) override {
    for (;;) {
      ssize_t k = ::read(fd_, dst, n);
      if (k >= 0) return static_cast<size_t>(k);
      if (errno == EINTR) continue;
      DTRAIN_THROW(kData, "reading '", path_, "' failed: ", std::strerror(errno));
    }
  }
  void seek(uint64_t offset) override {
    DTRAIN_CHECK(::lseek(fd_, static_cast<off_t>(offset), SEEK_SET) >= 0, kData, "seeking '", path_, "' to ",
                 offset, " failed: ", std::strerror(errno));
  }
  bool seekable() const override { return true; }
  uint64_t size() const override { return size_; }

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// zlib's inflate over a file. A gzip file may hold several members one after
// another (what `cat a.gz b.gz` makes); each is inflated in turn.
class InflateSource : public Source {
 public:
  InflateSource(const std::string& path, Compression c, size_t readBytes)
      : file_(path), path_(path), kind_(c), in_(readBytes) {
    std::memset(&z_, 0, sizeof(z_));
    int rc = inflateInit2(&z_, windowBits());
    DTRAIN_CHECK(rc == Z_OK, kData, "zlib could not start inflating '", path, "' (", rc, ")");
  }
  ~InflateSource() override { inflateEnd(&z_); }

  size_t read(uint8_t* dst, size_t n) override {
    z_.next_out = dst;
    z_.avail_out = static_cast<uInt>(n);
    while (z_.avail_out > 0 && !ended_) {
      if (z_.avail_in == 0) {
        size_t k = file_.read(in_.data(), in_.size());
        if (k == 0) {
          // The file ended. Fine between members (or before any byte of one); anywhere
          // else the stream was cut short.
          DTRAIN_CHECK(!midStream_, kData, "'", path_, "' is a ", compressionName(kind_),
                       " stream cut short: the file ends inside a compressed block after ", fileIn_,
                       " bytes (", produced_ + (n - z_.avail_out), " bytes inflated); re-copy or re-create it");
          ended_ = true;
          break;
        }
        fileIn_ += k;
        z_.next_in = in_.data();
        z_.avail_in = static_cast<uInt>(k);
      }
      midStream_ = true;
      int rc = inflate(&z_, Z_NO_FLUSH);
      if (rc == Z_STREAM_END) {
        midStream_ = false;
        if (kind_ == Compression::kGzip) {
          inflateReset(&z_);  // another member may follow
        } else {
          ended_ = true;  // a zlib stream is one member; trailing bytes are ignored, as TensorFlow does
        }
        continue;
      }
      if (rc == Z_BUF_ERROR && z_.avail_in == 0) continue;  // needs more input
      DTRAIN_CHECK(rc == Z_OK, kData, "'", path_, "' is not a valid ", compressionName(kind_), " stream (zlib: ",
                   z_.msg ? z_.msg : "error", ", code ", rc, ") near compressed byte ", fileIn_ - z_.avail_in,
                   "; check the compression argument (None, 'gzip' or 'zlib') matches how it was written");
    }
    size_t got = n - z_.avail_out;
    produced_ += got;
    return got;
  }
  void seek(uint64_t) override {
    DTRAIN_THROW(kData, "'", path_, "' is ", compressionName(kind_),
                 "-compressed and cannot seek; read it from the start");
  }
  bool seekable() const override { return false; }
  uint64_t size() const override { return UINT64_MAX; }

 private:
  int windowBits() const { return kind_ == Compression::kGzip ? 15 + 16 : 15; }

  FileSource file_;
  std::string path_;
  Compression kind_;
  std::vector<uint8_t> in_;
  z_stream z_;
  bool ended_ = false;
  bool midStream_ = false;
  uint64_t fileIn_ = 0, produced_ = 0;
};

}  // namespace

std::unique_ptr<Source> openSource(const std::string& path, Compression c, size_t readBytes) {
  if (c == Compression::kNone) return std::make_unique<FileSource>(path);
  return std::make_unique<InflateSource>(path, c, readBytes);
}

}  // namespace data
}  // namespace dtrain

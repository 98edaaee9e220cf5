#include "transport/shm/segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace dtrain {
namespace {

uint8_t* mapFd(int fd, size_t size, const std::string& name) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  DTRAIN_CHECK(p != MAP_FAILED, kComm, "cannot map shared memory ", name, " (", size, " bytes): ",
               std::strerror(errno), "; /dev/shm may be too small (docker: --shm-size)");
  return static_cast<uint8_t*>(p);
}

}  // namespace

Segment::~Segment() {
  if (data_) ::munmap(data_, size_);
  if (linked_) ::shm_unlink(name_.c_str());
}

Segment::Segment(Segment&& o) noexcept { *this = std::move(o); }

Segment& Segment::operator=(Segment&& o) noexcept {
  if (this != &o) {
    if (data_) ::munmap(data_, size_);
    if (linked_) ::shm_unlink(name_.c_str());
    name_ = std::move(o.name_);
    data_ = o.data_;
    size_ = o.size_;
    linked_ = o.linked_;
    o.data_ = nullptr;
    o.linked_ = false;
  }
  return *this;
}

Segment Segment::create(const std::string& name, size_t size) {
  int fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  DTRAIN_CHECK(fd >= 0, kComm, "cannot create shared memory ", name, ": ", std::strerror(errno));
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0) {
    int e = errno;
    ::close(fd);
    ::shm_unlink(name.c_str());
    DTRAIN_THROW(kComm, "cannot size shared memory ", name, " to ", size, " bytes: ", std::strerror(e),
                 "; free space in /dev/shm or lower DTRAIN_SHM_BYTES");
  }
  Segment s;
  s.name_ = name;
  s.size_ = size;
  s.linked_ = true;
  s.data_ = mapFd(fd, size, name);
  return s;
}

Segment Segment::open(const std::string& name, size_t size) {
  int fd = ::shm_open(name.c_str(), O_RDWR, 0600);
  DTRAIN_CHECK(fd >= 0, kComm, "cannot open shared memory ", name, ": ", std::strerror(errno));
  struct stat st{};
  ::fstat(fd, &st);
  DTRAIN_CHECK(static_cast<size_t>(st.st_size) >= size, kComm, "shared memory ", name, " has ",
               st.st_size, " bytes, expected ", size, ": ranks disagree on DTRAIN_SHM_BYTES");
  Segment s;
  s.name_ = name;
  s.size_ = size;
  s.data_ = mapFd(fd, size, name);
  return s;
}

void Segment::unlink() {
  if (linked_) ::shm_unlink(name_.c_str());
  linked_ = false;
}

}  // namespace dtrain

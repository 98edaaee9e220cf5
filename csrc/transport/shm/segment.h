// A POSIX shared-memory segment mapped into this process.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace dtrain {

class Segment {
 public:
  Segment() = default;
  ~Segment();
  Segment(Segment&& o) noexcept;
  Segment& operator=(Segment&& o) noexcept;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Creates a new zero-filled segment (fails if the name exists), mode 0600.
  static Segment create(const std::string& name, size_t size);
  static Segment open(const std::string& name, size_t size);
  // Removes the name; mappings stay valid. Safe to call twice.
  void unlink();

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& name() const { return name_; }

 private:
  std::string name_;
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  bool linked_ = false;
};

}  // namespace dtrain

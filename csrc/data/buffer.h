// Byte buffers whose resize() leaves new bytes unset.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace dtrain {
namespace data {

// An allocator that default-initializes (for bytes: leaves alone) what resize() adds:
// a batch column or a read buffer is written in full before anyone reads it, so zeroing
// it first would be a wasted pass over memory.
template <class T>
struct NoInit : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <class U>
  NoInit(const NoInit<U>&) {}
  template <class U, class... A>
  void construct(U* p, A&&... a) {
    if constexpr (sizeof...(A) == 0)
      ::new (static_cast<void*>(p)) U;
    else
      ::new (static_cast<void*>(p)) U(std::forward<A>(a)...);
  }
};
using Buffer = std::vector<uint8_t, NoInit<uint8_t>>;

}  // namespace data
}  // namespace dtrain

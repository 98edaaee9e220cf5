// The reduce/convert kernels compiled for the "avx2" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <immintrin.h>

#include <cstdint>

#include "collectives/reduce_kernels.h"
#include "common/half.h"

#pragma GCC target("avx2,f16c,fma")
#define DTRAIN_HAVE_F16C 1

namespace dtrain {
namespace isa_avx2 {
#include "collectives/reduce_kernels_impl.h"
}  // namespace isa_avx2

KernelTable kernelTable_avx2() { return isa_avx2::table("avx2"); }
}  // namespace dtrain

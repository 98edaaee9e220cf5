// The reduce/convert kernels compiled for the "avx512" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <immintrin.h>

#include <cstdint>

#include "collectives/reduce_kernels.h"
#include "common/half.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma")
#define DTRAIN_HAVE_AVX512 1

namespace dtrain {
namespace isa_avx512 {
#include "collectives/reduce_kernels_impl.h"
}  // namespace isa_avx512

KernelTable kernelTable_avx512() { return isa_avx512::table("avx512"); }
}  // namespace dtrain

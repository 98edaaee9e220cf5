// The optimizer chunk loops compiled for the "avx512" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <immintrin.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/half.h"
#include "kernels/cpu/optim.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,fma")
#define DTRAIN_OPT_AVX512 1

namespace dtrain {
namespace kernels {
namespace isa_avx512 {
#include "kernels/cpu/optim_impl.h"
#include "kernels/cpu/nn_impl.h"
#include "kernels/cpu/fusion_impl.h"
}  // namespace isa_avx512

CpuTable optimTable_avx512() { return isa_avx512::table("avx512"); }
}  // namespace kernels
}  // namespace dtrain

// The optimizer chunk loops compiled for the "avx2" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <immintrin.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/half.h"
#include "kernels/cpu/optim.h"

#pragma GCC target("avx2,f16c,fma")
#define DTRAIN_OPT_F16C 1

namespace dtrain {
namespace kernels {
namespace isa_avx2 {
#include "kernels/cpu/optim_impl.h"
#include "kernels/cpu/nn_impl.h"
#include "kernels/cpu/fusion_impl.h"
}  // namespace isa_avx2

CpuTable optimTable_avx2() { return isa_avx2::table("avx2"); }
}  // namespace kernels
}  // namespace dtrain

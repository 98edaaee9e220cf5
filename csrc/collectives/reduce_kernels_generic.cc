// The reduce/convert kernels compiled for the "generic" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <immintrin.h>

#include <cstdint>

#include "collectives/reduce_kernels.h"
#include "common/half.h"




namespace dtrain {
namespace isa_generic {
#include "collectives/reduce_kernels_impl.h"
}  // namespace isa_generic

KernelTable kernelTable_generic() { return isa_generic::table("generic"); }
}  // namespace dtrain

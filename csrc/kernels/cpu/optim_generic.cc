// The optimizer chunk loops compiled for the "generic" instruction set.
// Headers come before the target pragma so only our own code is retargeted.
#include <cstdint>

#include "common/dtype.h"
#include "common/half.h"
#include "kernels/cpu/optim.h"



namespace dtrain {
namespace kernels {
namespace isa_generic {
#include "kernels/cpu/optim_impl.h"
#include "kernels/cpu/nn_impl.h"
#include "kernels/cpu/fusion_impl.h"
}  // namespace isa_generic

CpuTable optimTable_generic() { return isa_generic::table("generic"); }
}  // namespace kernels
}  // namespace dtrain

// Host entry points of the CUDA kernels (compiled by nvcc into the extension when a
// toolkit is found; DTRAIN_WITH_CUDA is then defined). Plain C++, no CUDA headers, so
// the bindings include it as they are. Every call launches on `stream` (torch's
// current stream, passed as an integer) and returns without waiting.
#pragma once

#include <cstdint>

#include "kernels/cpu/optim.h"

namespace dtrain {
namespace kernels {
namespace cuda {

// `foundInf`: a device float; when not null and non-zero at run time, the kernels change
// nothing (GradScaler's found_inf, read on the device, so the host never waits).
void adamStep(const TensorLists& t, Decay decay, bool amsgrad, const AdamArgs& a, const float* foundInf,
              uintptr_t stream);
void sgdStep(const TensorLists& t, bool l2, Momentum momentum, bool nesterov, const SgdArgs& a, const float* foundInf,
             uintptr_t stream);
// Tensor fusion on the device, as packTensors/unpackTensors on the CPU.
void pack(const std::vector<const void*>& src, const std::vector<int64_t>& numel, DType srcType, void* flat,
          DType flatType, float scale, uintptr_t stream);
void unpack(const void* flat, DType flatType, const std::vector<void*>& dst, const std::vector<int64_t>& numel,
            DType dstType, float scale, bool accumulate, uintptr_t stream);
// The name of the last CUDA error since the previous call, or an empty string.
const char* lastError();

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

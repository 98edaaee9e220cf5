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
// The L2 (or, with `inf`, max-abs) norm of all tensors together into out[0], a device
// float (NaN when any element is NaN). partSq/partMax: totalBlocks(numel) scratch each.
void norm(const std::vector<const void*>& x, const std::vector<int64_t>& numel, DType dt, double* partSq,
          float* partMax, bool inf, float* out, uintptr_t stream);

// y = gelu(x + b) over rows of n; backward: dx and db (part: colChunks(rows) * n floats).
void geluForward(DType dt, const void* x, const void* b, void* y, int64_t rows, int64_t n, uintptr_t stream);
void geluBackward(DType dt, const void* dy, const void* x, const void* b, void* dx, void* db, float* part,
                  int64_t rows, int64_t n, uintptr_t stream);
// LayerNorm over rows of n (w, b may be null; mean/rstd float32 per row); backward: dx,
// and dw/db where not null (part: 2 * colChunks(rows) * n floats).
void layerNormForward(DType dt, const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                      int64_t rows, int64_t n, float eps, uintptr_t stream);
void layerNormBackward(DType dt, const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                       void* dx, void* dw, void* db, float* part, int64_t rows, int64_t n, uintptr_t stream);

// The name of the last CUDA error since the previous call, or an empty string.
const char* lastError();

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

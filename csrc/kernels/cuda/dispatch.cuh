// Host-side type dispatch shared by the nvcc launchers (optim.cu, nn.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/dtype.h"
#include "common/error.h"

namespace dtrain {
namespace kernels {
namespace cuda {

// Calls f(T{}) with T the CUDA storage type of dt (float, __half or __nv_bfloat16).
template <class F>
void withType(DType dt, F f) {
  if (dt == DType::kFloat16) return f(__half{});
  if (dt == DType::kBFloat16) return f(__nv_bfloat16{});
  DTRAIN_CHECK(dt == DType::kFloat32, kConfig, "the CUDA kernels take float32, float16 and bfloat16, not ",
               dtypeName(dt));
  f(float{});
}

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

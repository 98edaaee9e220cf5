// Bias+GELU and LayerNorm over rows of a [rows, n] float32 or float64 tensor, forward
// and backward, split into contiguous row ranges over `threads` threads. Per-column
// gradient sums (db, dw) are accumulated in double per thread and added in thread
// order, so a result depends on the thread count only through that order.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace dtrain {
namespace kernels {

void geluForward(DType dt, const void* x, const void* bias, void* y, int64_t rows, int64_t n, int threads);
// dx = dy * gelu'(x + bias); dbias = sum of dx over the rows.
void geluBackward(DType dt, const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t rows,
                  int64_t n, int threads);
// y = (x - mean) * rstd * weight + bias per row (weight and bias may be null); writes
// mean and rstd ([rows]) for the backward.
void layerNormForward(DType dt, const void* x, const void* weight, const void* bias, void* y, void* mean, void* rstd,
                      int64_t rows, int64_t n, double eps, int threads);
// dx, and (when not null) dweight and dbias.
void layerNormBackward(DType dt, const void* dy, const void* x, const void* weight, const void* mean,
                       const void* rstd, void* dx, void* dweight, void* dbias, int64_t rows, int64_t n, int threads);

}  // namespace kernels
}  // namespace dtrain

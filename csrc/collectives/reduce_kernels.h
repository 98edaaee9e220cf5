// Element-wise kernels used by the collectives: reduce, encode/decode for
// half-precision wire formats, and scaling (for op="avg").
//
// One portable body (reduce_kernels_impl.h) is compiled once per instruction
// set; `kernels()` picks the best table for this CPU at first use.
#pragma once

#include <cstddef>

#include "common/dtype.h"

namespace dtrain {

struct KernelTable {
  const char* isa;
  // dst[i] = dst[i] <op> src[i] for n elements of dtype dt (op != avg: avg is sum + scale).
  void (*reduce)(DType dt, RedOp op, void* dst, const void* src, size_t n);
  // dst[i] = dst[i] <op> float(src_wire[i]) with dst float32, src fp16/bf16.
  void (*reduceWire)(DType wire, RedOp op, float* dst, const void* src, size_t n);
  // dst_wire[i] = round(src[i]) (float32 -> fp16/bf16, round to nearest even).
  void (*encode)(DType wire, void* dst, const float* src, size_t n);
  // dst[i] = float(src_wire[i]).
  void (*decode)(DType wire, float* dst, const void* src, size_t n);
  // x[i] *= s (floating types only).
  void (*scale)(DType dt, void* x, size_t n, double s);
};

const KernelTable& kernels();
// Force a table by name ("generic", "avx2", "avx512"); returns false if this CPU lacks it.
bool setKernelIsa(const char* name);

// x[i] = float(round_wire(x[i])): what a value becomes after one trip over the wire.
void roundTripWire(DType wire, float* x, size_t n);

}  // namespace dtrain

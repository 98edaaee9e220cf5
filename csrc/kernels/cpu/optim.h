// Multi-tensor optimizer steps on the CPU: one call updates every parameter of a
// group, split into chunks over `threads` threads, vectorised for the CPU's ISA.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "common/dtype.h"
#include "kernels/optim_math.h"

namespace dtrain {
namespace kernels {

// The tensors of one call, by slot. Adam: kParam, kGrad, kExpAvg, kExpAvgSq,
// kMaxExpAvgSq (amsgrad only). SGD: kParam, kGrad, kMomentumBuf.
enum Slot : int { kParam = 0, kGrad = 1, kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kMomentumBuf = 2 };
constexpr int kSlots = 5;

struct TensorLists {
  std::vector<std::array<void*, kSlots>> ptr;  // per tensor, per slot
  std::vector<int64_t> numel;
  DType dtype = DType::kFloat32;               // of every slot's tensors
};

// Both return true when some grad holds an inf or NaN (checked first, only when
// `checkFinite`); nothing is updated then.
bool adamStep(const TensorLists& t, Decay decay, bool amsgrad, const AdamArgs& a, bool checkFinite, int threads);
bool sgdStep(const TensorLists& t, bool l2, Momentum momentum, bool nesterov, const SgdArgs& a, bool checkFinite,
             int threads);

// The ISA the kernels run ("avx512", "avx2" or "generic").
const char* optimIsa();

// A piece of a multi-tensor norm.
struct NormPart {
  double sumSq = 0;
  float maxAbs = 0;
  bool nan = false;
};

// Copies every tensor into one flat buffer (`pack`) or back (`unpack`), casting between
// float32/fp16/bf16, multiplying by `scale`, and (unpack) adding into the destination
// when `accumulate`. Tensor i occupies flat[offset_i, offset_i + numel_i), offsets in order.
void packTensors(const std::vector<const void*>& src, const std::vector<int64_t>& numel, DType srcType, void* flat,
                 DType flatType, float scale, int threads);
void unpackTensors(const void* flat, DType flatType, const std::vector<void*>& dst, const std::vector<int64_t>& numel,
                   DType dstType, float scale, bool accumulate, int threads);
// Sum of squares (in double) and max |x| over all tensors; nan when any element is NaN.
NormPart multiTensorNorm(const std::vector<const void*>& x, const std::vector<int64_t>& numel, DType dt, int threads);
// Every element of every tensor multiplied by `s` in place (computed in float32, rounded
// back to the tensors' dtype), as torch's x.mul_(s) with a float32 scalar.
void scaleTensors(const std::vector<void*>& x, const std::vector<int64_t>& numel, DType dt, float s, int threads);

// Outputs of at least this many bytes are written with non-temporal stores (`stream` below):
// a consumer would not find them in the caches anyway, and a normal store reads each line first.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// Per-ISA chunk functions (optim_{generic,avx2,avx512}.cc).
struct CpuTable {
  const char* name;
  void (*adam)(DType, Decay, bool amsgrad, void* const* slots, int64_t begin, int64_t end, const AdamArgs&);
  void (*sgd)(DType, bool l2, Momentum, bool nesterov, void* const* slots, int64_t begin, int64_t end, const SgdArgs&);
  bool (*finite)(DType, const void* grad, int64_t begin, int64_t end);
  // `stream` (float32 -> fp16 only; others ignore it): non-temporal stores, as below.
  void (*convert)(DType dstType, void* dst, DType srcType, const void* src, int64_t n, float scale, bool add,
                  bool stream);
  NormPart (*norm)(DType, const void* x, int64_t n);
  void (*scale)(DType, void* x, int64_t n, float s);  // x *= s in place, computed in float32
  // Rows [r0, r1) of `n` elements each (float32 or float64); see nn.h.
  // `stream`: write the output with non-temporal stores (it is larger than the caches).
  void (*geluFwd)(DType, const void* x, const void* b, void* y, int64_t r0, int64_t r1, int64_t n, bool stream);
  void (*geluBwd)(DType, const void* dy, const void* x, const void* b, void* dx, double* db, int64_t r0, int64_t r1,
                  int64_t n, void* scratch, bool stream);
  void (*lnFwd)(DType, const void* x, const void* w, const void* b, void* y, void* mean, void* rstd, int64_t r0,
                int64_t r1, int64_t n, double eps, bool stream);
  void (*lnBwd)(DType, const void* dy, const void* x, const void* w, const void* mean, const void* rstd, void* dx,
                double* dw, double* db, int64_t r0, int64_t r1, int64_t n, void* scratch, bool stream);
};

// The table for this CPU (or the one DTRAIN_ISA names).
const CpuTable& cpuTable();

}  // namespace kernels
}  // namespace dtrain

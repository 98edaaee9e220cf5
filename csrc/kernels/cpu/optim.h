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

// Per-ISA chunk functions (optim_{generic,avx2,avx512}.cc).
struct OptimTable {
  const char* name;
  void (*adam)(DType, Decay, bool amsgrad, void* const* slots, int64_t begin, int64_t end, const AdamArgs&);
  void (*sgd)(DType, bool l2, Momentum, bool nesterov, void* const* slots, int64_t begin, int64_t end, const SgdArgs&);
  bool (*finite)(DType, const void* grad, int64_t begin, int64_t end);
};

}  // namespace kernels
}  // namespace dtrain

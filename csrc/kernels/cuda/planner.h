// Host side of the multi-tensor launches: cuts tensor lists into Launch blocks. Used
// by the nvcc-built launchers and, through the bindings, by the NVRTC path, so both
// launch the same blocks.
#pragma once

#include <cstring>

#include "kernels/cpu/optim.h"
#include "kernels/cuda/plan.h"

namespace dtrain {
namespace kernels {
namespace cuda {

static_assert(kPtrSlots == kSlots, "plan.h's kPtrSlots must equal optim.h's kSlots");

// Calls launch(L, blocks) for each launch of at most kMaxTensors tensors and kMaxBlocks
// chunks, `slots` pointer slots per tensor. A tensor with more chunks than one launch
// holds goes on in the next launch as its slot 0. Empty tensors are skipped.
template <class F>
void forEachLaunch(const TensorLists& t, int slots, F launch) {
  Launch L;
  std::memset(&L, 0, sizeof(L));
  int tensors = 0, blocks = 0;
  for (size_t i = 0; i < t.numel.size(); ++i) {
    if (t.numel[i] == 0) continue;
    for (int s = 0; s < slots; ++s) L.slot[s][tensors] = t.ptr[i][s];
    L.numel[tensors] = t.numel[i];
    const int64_t chunks = (t.numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      L.blockTensor[blocks] = static_cast<short>(tensors);
      L.blockChunk[blocks] = static_cast<int>(c);
      if (++blocks == kMaxBlocks) {
        launch(L, blocks);
        blocks = 0;
        if (c + 1 < chunks) {
          for (int s = 0; s < slots; ++s) L.slot[s][0] = L.slot[s][tensors];
          L.numel[0] = L.numel[tensors];
          tensors = 0;
        } else {
          tensors = -1;
        }
      }
    }
    if (++tensors == kMaxTensors) {
      if (blocks) launch(L, blocks);
      blocks = 0;
      tensors = 0;
    }
  }
  if (blocks) launch(L, blocks);
}

// Blocks over all launches (the norm's partial-sum count).
inline int64_t totalBlocks(const std::vector<int64_t>& numel) {
  int64_t b = 0;
  for (int64_t n : numel) b += (n + kChunk - 1) / kChunk;
  return b;
}

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

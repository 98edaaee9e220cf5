// The launch geometry of the CUDA kernels and the multi-tensor argument block, in
// plain C++ that three compilers read: nvcc (device.cuh and the host launchers), NVRTC
// (the same kernels compiled at run time, dtrain/ops/_nvrtc.py) and the host compiler
// (the bindings, which plan launches for the NVRTC path and report this layout so
// Python can check it). No standard headers: NVRTC has none.
#pragma once

namespace dtrain {
namespace kernels {
namespace cuda {

constexpr int kMaxTensors = 24;   // per launch: the argument block stays under the 4 KiB limit
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 1 << 16;   // elements of one tensor per block
constexpr int kThreads = 512;     // threads per block of the multi-tensor kernels
constexpr int kPtrSlots = 5;      // as kSlots of kernels/cpu/optim.h (checked there)
constexpr int kSlotParam = 0;     // slots 2.. are the optimizer's state, as optim.h's Slot
constexpr int kSlotGrad = 1;

// Column reductions (bias, LayerNorm weight/bias grads): blocks of kColTile columns x
// kColRows threads; grid.y = colChunks(rows) row chunks, each writing one row of
// float partial sums that a second kernel adds up in chunk order (deterministic).
constexpr int kColTile = 32;
constexpr int kColRows = 8;
constexpr int kRowsPerWarpBlock = 8;  // LayerNorm: one warp per row, 8 rows per block

#if !defined(__CUDACC_RTC__)  // host only: the launchers and the bindings
inline long long colChunks(long long rows) {
  const long long c = (rows + 4 * kColRows - 1) / (4 * kColRows);
  return c < 1 ? 1 : (c > 128 ? 128 : c);
}
#endif

// One multi-tensor launch: block b works on chunk blockChunk[b] of tensor blockTensor[b].
struct Launch {
  void* slot[kPtrSlots][kMaxTensors];
  long long numel[kMaxTensors];
  short blockTensor[kMaxBlocks];
  int blockChunk[kMaxBlocks];
};

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

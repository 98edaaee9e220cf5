// Host launchers of every CUDA kernel in device.cuh (one translation unit, as the
// kernels are defined in the header), built by nvcc into the extension.
// Multi-tensor calls follow apex's multi_tensor_apply layout: one launch updates up to
// kMaxTensors tensors, each block one chunk of one tensor (planner.h cuts the lists).
#include <cuda_runtime.h>

#include <algorithm>

#include "common/error.h"
#include "kernels/cuda/device.cuh"
#include "kernels/cuda/dispatch.cuh"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/planner.h"

namespace dtrain {
namespace kernels {
namespace cuda {

namespace {

template <class T>
void adamTyped(const TensorLists& t, Decay d, bool ams, const AdamArgs& a, const float* fi, cudaStream_t s) {
  forEachLaunch(t, ams ? 5 : 4, [&](const Launch& L, int blocks) {
#define DTRAIN_ADAM(D, A) adamKernel<T, D, A><<<blocks, kThreads, 0, s>>>(L, a, fi)
    if (d == Decay::kNone) ams ? DTRAIN_ADAM(Decay::kNone, true) : DTRAIN_ADAM(Decay::kNone, false);
    if (d == Decay::kL2) ams ? DTRAIN_ADAM(Decay::kL2, true) : DTRAIN_ADAM(Decay::kL2, false);
    if (d == Decay::kDecoupled) ams ? DTRAIN_ADAM(Decay::kDecoupled, true) : DTRAIN_ADAM(Decay::kDecoupled, false);
#undef DTRAIN_ADAM
  });
}

template <class T, bool kL2>
void sgdTyped(const TensorLists& t, Momentum m, bool nes, const SgdArgs& a, const float* fi, cudaStream_t s) {
  forEachLaunch(t, m == Momentum::kNone ? 2 : 3, [&](const Launch& L, int blocks) {
#define DTRAIN_SGD(M, N) sgdKernel<T, kL2, M, N><<<blocks, kThreads, 0, s>>>(L, a, fi)
    if (m == Momentum::kNone) DTRAIN_SGD(Momentum::kNone, false);
    if (m == Momentum::kFirst) nes ? DTRAIN_SGD(Momentum::kFirst, true) : DTRAIN_SGD(Momentum::kFirst, false);
    if (m == Momentum::kLater) nes ? DTRAIN_SGD(Momentum::kLater, true) : DTRAIN_SGD(Momentum::kLater, false);
#undef DTRAIN_SGD
  });
}

// Slot 0 -> slot 1 of every tensor, cast from st to dt, scaled, optionally added.
void convertLists(const TensorLists& t, DType st, DType dt, float scale, bool add, cudaStream_t s) {
  withType(st, [&](auto src) {
    withType(dt, [&](auto dst) {
      using S = decltype(src);
      using D = decltype(dst);
      forEachLaunch(t, 2, [&](const Launch& L, int blocks) {
        convertKernel<S, D><<<blocks, kThreads, 0, s>>>(L, scale, add ? 1 : 0);
      });
    });
  });
}

// Pairs every tensor with its place in the flat buffer: slot 0 the source, slot 1 the
// destination.
TensorLists flatPairs(const std::vector<void*>& tensors, const std::vector<int64_t>& numel, void* flat,
                      DType flatType, bool toFlat) {
  TensorLists t;
  t.numel = numel;
  t.ptr.assign(numel.size(), {});
  char* f = static_cast<char*>(flat);
  for (size_t i = 0; i < numel.size(); ++i) {
    t.ptr[i][toFlat ? 0 : 1] = tensors[i];
    t.ptr[i][toFlat ? 1 : 0] = f;
    f += numel[i] * dtypeSize(flatType);
  }
  return t;
}

}  // namespace

void adamStep(const TensorLists& t, Decay decay, bool amsgrad, const AdamArgs& a, const float* foundInf,
              uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(t.dtype, [&](auto v) { adamTyped<decltype(v)>(t, decay, amsgrad, a, foundInf, s); });
}

void sgdStep(const TensorLists& t, bool l2, Momentum momentum, bool nesterov, const SgdArgs& a, const float* foundInf,
             uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(t.dtype, [&](auto v) {
    using T = decltype(v);
    l2 ? sgdTyped<T, true>(t, momentum, nesterov, a, foundInf, s) : sgdTyped<T, false>(t, momentum, nesterov, a,
                                                                                        foundInf, s);
  });
}

void pack(const std::vector<const void*>& src, const std::vector<int64_t>& numel, DType srcType, void* flat,
          DType flatType, float scale, uintptr_t stream) {
  std::vector<void*> p(src.size());
  for (size_t i = 0; i < src.size(); ++i) p[i] = const_cast<void*>(src[i]);
  convertLists(flatPairs(p, numel, flat, flatType, true), srcType, flatType, scale, false,
               reinterpret_cast<cudaStream_t>(stream));
}

void unpack(const void* flat, DType flatType, const std::vector<void*>& dst, const std::vector<int64_t>& numel,
            DType dstType, float scale, bool accumulate, uintptr_t stream) {
  convertLists(flatPairs(dst, numel, const_cast<void*>(flat), flatType, false), flatType, dstType, scale, accumulate,
               reinterpret_cast<cudaStream_t>(stream));
}

void norm(const std::vector<const void*>& x, const std::vector<int64_t>& numel, DType dt, double* partSq,
          float* partMax, bool inf, float* out, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  TensorLists t;
  t.numel = numel;
  t.ptr.assign(numel.size(), {});
  for (size_t i = 0; i < x.size(); ++i) t.ptr[i][0] = const_cast<void*>(x[i]);
  int base = 0;
  withType(dt, [&](auto v) {
    forEachLaunch(t, 1, [&](const Launch& L, int blocks) {
      normKernel<decltype(v)><<<blocks, kThreads, 0, s>>>(L, partSq, partMax, base);
      base += blocks;
    });
  });
  normFinishKernel<<<1, kThreads, 0, s>>>(partSq, partMax, base, inf ? 1 : 0, out);
}

namespace {  // GELU/LayerNorm launch geometry

int gridFor(int64_t elements) { return static_cast<int>(std::min<int64_t>((elements + 255) / 256, 4096)); }

dim3 colGrid(int64_t rows, int64_t n) {
  return dim3(static_cast<unsigned>((n + kColTile - 1) / kColTile), static_cast<unsigned>(colChunks(rows)));
}

template <class T>
const T* C(const void* p) { return static_cast<const T*>(p); }
template <class T>
T* M(void* p) { return static_cast<T*>(p); }

}  // namespace

void geluForward(DType dt, const void* x, const void* b, void* y, int64_t rows, int64_t n, uintptr_t stream) {
  if (rows * n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(dt, [&](auto v) {
    using T = decltype(v);
    geluFwdKernel<T><<<gridFor(rows * n), 256, 0, s>>>(C<T>(x), C<T>(b), M<T>(y), rows, n);
  });
}

void geluBackward(DType dt, const void* dy, const void* x, const void* b, void* dx, void* db, float* part,
                  int64_t rows, int64_t n, uintptr_t stream) {
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(dt, [&](auto v) {
    using T = decltype(v);
    const int chunks = static_cast<int>(colChunks(rows));
    geluBwdKernel<T><<<colGrid(rows, n), dim3(kColTile, kColRows), 0, s>>>(C<T>(dy), C<T>(x), C<T>(b), M<T>(dx),
                                                                          part, rows, n);
    colSumKernel<T><<<gridFor(n), 256, 0, s>>>(part, chunks, n, M<T>(db));
  });
}

void layerNormForward(DType dt, const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                      int64_t rows, int64_t n, float eps, uintptr_t stream) {
  if (rows == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(dt, [&](auto v) {
    using T = decltype(v);
    const unsigned blocks = static_cast<unsigned>((rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock);
    lnFwdKernel<T><<<blocks, dim3(32, kRowsPerWarpBlock), 0, s>>>(C<T>(x), C<T>(w), C<T>(b), M<T>(y), mean, rstd,
                                                                  rows, static_cast<int>(n), eps);
  });
}

void layerNormBackward(DType dt, const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                       void* dx, void* dw, void* db, float* part, int64_t rows, int64_t n, uintptr_t stream) {
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  withType(dt, [&](auto v) {
    using T = decltype(v);
    if (rows > 0) {
      const unsigned blocks = static_cast<unsigned>((rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock);
      lnBwdKernel<T><<<blocks, dim3(32, kRowsPerWarpBlock), 0, s>>>(C<T>(dy), C<T>(x), C<T>(w), mean, rstd, M<T>(dx),
                                                                    rows, static_cast<int>(n));
    }
    if (!dw && !db) return;
    const int chunks = static_cast<int>(colChunks(rows));
    float* dwPart = dw ? part : nullptr;
    float* dbPart = db ? part + int64_t(chunks) * n : nullptr;
    lnBwdColKernel<T><<<colGrid(rows, n), dim3(kColTile, kColRows), 0, s>>>(C<T>(dy), C<T>(x), mean, rstd, dwPart,
                                                                           dbPart, rows, n);
    if (dw) colSumKernel<T><<<gridFor(n), 256, 0, s>>>(dwPart, chunks, n, M<T>(dw));
    if (db) colSumKernel<T><<<gridFor(n), 256, 0, s>>>(dbPart, chunks, n, M<T>(db));
  });
}

const char* lastError() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

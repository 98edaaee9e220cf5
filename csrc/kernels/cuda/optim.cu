// Multi-tensor CUDA kernels: one launch updates up to kMaxTensors tensors, each block
// one chunk of one tensor (the layout of apex's multi_tensor_apply). The per-element
// math is kernels/optim_math.h, the same code the CPU kernels run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "common/error.h"
#include "kernels/cuda/launch.h"
#include "kernels/optim_math.h"

namespace dtrain {
namespace kernels {
namespace cuda {

namespace {

constexpr int kMaxTensors = 24;   // per launch: the argument block stays under the 4 KiB limit
constexpr int kMaxBlocks = 320;
constexpr int kChunk = 1 << 16;   // elements per block
constexpr int kThreads = 512;

struct Launch {
  void* slot[kSlots][kMaxTensors];
  int64_t numel[kMaxTensors];
  int16_t blockTensor[kMaxBlocks];
  int32_t blockChunk[kMaxBlocks];
};

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// This block's tensor and element range; false when GradScaler found inf/NaN (skip all).
struct Span {
  int t;
  int64_t begin, end;
};
__device__ __forceinline__ bool blockSpan(const Launch& L, const float* foundInf, Span& s) {
  if (foundInf && *foundInf != 0.f) return false;
  s.t = L.blockTensor[blockIdx.x];
  s.begin = int64_t(L.blockChunk[blockIdx.x]) * kChunk;
  s.end = min(L.numel[s.t], s.begin + kChunk);
  return true;
}

template <class T, Decay kDecay, bool kAms>
__global__ void adamKernel(Launch L, AdamArgs a, const float* foundInf) {
  Span sp;
  if (!blockSpan(L, foundInf, sp)) return;
  const int t = sp.t;
  T* p = static_cast<T*>(L.slot[kParam][t]);
  const T* g = static_cast<const T*>(L.slot[kGrad][t]);
  T* m = static_cast<T*>(L.slot[kExpAvg][t]);
  T* v = static_cast<T*>(L.slot[kExpAvgSq][t]);
  T* vm = static_cast<T*>(L.slot[kMaxExpAvgSq][t]);
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    float pf = ld(p, i), mf = ld(m, i), vf = ld(v, i), vmf = kAms ? ld(vm, i) : 0.f;
    adamMath<kDecay, kAms>(pf, ld(g, i), mf, vf, vmf, a);
    st(p, i, pf);
    st(m, i, mf);
    st(v, i, vf);
    if (kAms) st(vm, i, vmf);
  }
}

template <class T, bool kL2, Momentum kMom, bool kNesterov>
__global__ void sgdKernel(Launch L, SgdArgs a, const float* foundInf) {
  Span sp;
  if (!blockSpan(L, foundInf, sp)) return;
  const int t = sp.t;
  T* p = static_cast<T*>(L.slot[kParam][t]);
  const T* g = static_cast<const T*>(L.slot[kGrad][t]);
  T* buf = static_cast<T*>(L.slot[kMomentumBuf][t]);
  for (int64_t i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    float pf = ld(p, i), bf = kMom == Momentum::kLater ? ld(buf, i) : 0.f;
    sgdMath<kL2, kMom, kNesterov>(pf, ld(g, i), bf, a);
    st(p, i, pf);
    if (kMom != Momentum::kNone) st(buf, i, bf);
  }
}

// Cuts the tensor lists into launches of at most kMaxTensors tensors and kMaxBlocks
// chunks, calling launch(L, blocks) for each.
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
      L.blockTensor[blocks] = static_cast<int16_t>(tensors);
      L.blockChunk[blocks] = static_cast<int32_t>(c);
      if (++blocks == kMaxBlocks) {
        launch(L, blocks);
        blocks = 0;
        if (c + 1 < chunks) {  // the tensor goes on in the next launch, as its slot 0
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

template <class S, class D>
__global__ void convertKernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n, float scale, bool add) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = ld(src, i) * scale;
    st(dst, i, add ? ld(dst, i) + v : v);
  }
}

template <class S, class D>
void convertTyped(const void* src, void* dst, int64_t n, float scale, bool add, cudaStream_t s) {
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  convertKernel<S, D><<<blocks, kThreads, 0, s>>>(static_cast<const S*>(src), static_cast<D*>(dst), n, scale, add);
}

template <class S>
void convertFrom(DType dd, const void* src, void* dst, int64_t n, float scale, bool add, cudaStream_t s) {
  if (dd == DType::kFloat16) return convertTyped<S, __half>(src, dst, n, scale, add, s);
  if (dd == DType::kBFloat16) return convertTyped<S, __nv_bfloat16>(src, dst, n, scale, add, s);
  return convertTyped<S, float>(src, dst, n, scale, add, s);
}

void convert(DType sd, const void* src, DType dd, void* dst, int64_t n, float scale, bool add, cudaStream_t s) {
  if (n == 0) return;
  if (sd == DType::kFloat16) return convertFrom<__half>(dd, src, dst, n, scale, add, s);
  if (sd == DType::kBFloat16) return convertFrom<__nv_bfloat16>(dd, src, dst, n, scale, add, s);
  return convertFrom<float>(dd, src, dst, n, scale, add, s);
}

size_t bytesOf(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

}  // namespace

void adamStep(const TensorLists& t, Decay decay, bool amsgrad, const AdamArgs& a, const float* foundInf,
              uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (t.dtype == DType::kFloat16) return adamTyped<__half>(t, decay, amsgrad, a, foundInf, s);
  if (t.dtype == DType::kBFloat16) return adamTyped<__nv_bfloat16>(t, decay, amsgrad, a, foundInf, s);
  DTRAIN_CHECK(t.dtype == DType::kFloat32, kConfig, "fused Adam takes float32/16/bf16, not ", dtypeName(t.dtype));
  adamTyped<float>(t, decay, amsgrad, a, foundInf, s);
}

void sgdStep(const TensorLists& t, bool l2, Momentum momentum, bool nesterov, const SgdArgs& a, const float* foundInf,
             uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (t.dtype == DType::kFloat16)
    return l2 ? sgdTyped<__half, true>(t, momentum, nesterov, a, foundInf, s)
              : sgdTyped<__half, false>(t, momentum, nesterov, a, foundInf, s);
  if (t.dtype == DType::kBFloat16)
    return l2 ? sgdTyped<__nv_bfloat16, true>(t, momentum, nesterov, a, foundInf, s)
              : sgdTyped<__nv_bfloat16, false>(t, momentum, nesterov, a, foundInf, s);
  DTRAIN_CHECK(t.dtype == DType::kFloat32, kConfig, "fused SGD takes float32/16/bf16, not ", dtypeName(t.dtype));
  l2 ? sgdTyped<float, true>(t, momentum, nesterov, a, foundInf, s)
     : sgdTyped<float, false>(t, momentum, nesterov, a, foundInf, s);
}

void pack(const std::vector<const void*>& src, const std::vector<int64_t>& numel, DType srcType, void* flat,
          DType flatType, float scale, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  int64_t off = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    convert(srcType, src[i], flatType, static_cast<char*>(flat) + off * bytesOf(flatType), numel[i], scale, false, s);
    off += numel[i];
  }
}

void unpack(const void* flat, DType flatType, const std::vector<void*>& dst, const std::vector<int64_t>& numel,
            DType dstType, float scale, bool accumulate, uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  int64_t off = 0;
  for (size_t i = 0; i < dst.size(); ++i) {
    convert(flatType, static_cast<const char*>(flat) + off * bytesOf(flatType), dstType, dst[i], numel[i], scale,
            accumulate, s);
    off += numel[i];
  }
}

const char* lastError() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

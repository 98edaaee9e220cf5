// Every CUDA kernel of dtrain, device code only, so that nvcc builds it into the
// extension (with the host launchers in optim.cu and nn.cu) and NVRTC compiles the very
// same text at run time where the extension has no CUDA (dtrain/ops/_nvrtc.py inlines
// the quoted includes). No standard headers, no host code.
//
// Multi-tensor kernels take their Launch block by value (nvcc path) or through a device
// pointer (the *Rtc variants: NVRTC launches pass only pointers and scalars); both run
// the same __device__ body. Math is float32 whatever the storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/cuda/plan.h"
#include "kernels/optim_math.h"

namespace dtrain {
namespace kernels {
namespace cuda {

typedef long long i64;

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const __half* p, i64 i) { return __half2float(p[i]); }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, i64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, i64 i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, i64 i, float v) { p[i] = __float2bfloat16_rn(v); }

// ---- multi-tensor: optimizers, conversion, norms ------------------------------------

// This block's tensor and element range; false when GradScaler found inf/NaN (skip all).
struct Span {
  int t;
  i64 begin, end;
};
__device__ __forceinline__ bool blockSpan(const Launch& L, const float* foundInf, Span& s) {
  if (foundInf && *foundInf != 0.f) return false;
  s.t = L.blockTensor[blockIdx.x];
  s.begin = i64(L.blockChunk[blockIdx.x]) * kChunk;
  s.end = min(L.numel[s.t], s.begin + kChunk);
  return true;
}

template <class T, Decay kDecay, bool kAms>
__device__ __forceinline__ void adamBody(const Launch& L, const AdamArgs& a, const float* foundInf) {
  Span sp;
  if (!blockSpan(L, foundInf, sp)) return;
  T* p = static_cast<T*>(L.slot[kSlotParam][sp.t]);
  const T* g = static_cast<const T*>(L.slot[kSlotGrad][sp.t]);
  T* m = static_cast<T*>(L.slot[2][sp.t]);
  T* v = static_cast<T*>(L.slot[3][sp.t]);
  T* vm = static_cast<T*>(L.slot[4][sp.t]);
  for (i64 i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    float pf = ld(p, i), mf = ld(m, i), vf = ld(v, i), vmf = kAms ? ld(vm, i) : 0.f;
    adamMath<kDecay, kAms>(pf, ld(g, i), mf, vf, vmf, a);
    st(p, i, pf);
    st(m, i, mf);
    st(v, i, vf);
    if (kAms) st(vm, i, vmf);
  }
}
template <class T, Decay kDecay, bool kAms>
__global__ void adamKernel(Launch L, AdamArgs a, const float* foundInf) {
  adamBody<T, kDecay, kAms>(L, a, foundInf);
}
template <class T, Decay kDecay, bool kAms>
__global__ void adamKernelRtc(const Launch* L, const AdamArgs* a, const float* foundInf) {
  adamBody<T, kDecay, kAms>(*L, *a, foundInf);
}

template <class T, bool kL2, Momentum kMom, bool kNesterov>
__device__ __forceinline__ void sgdBody(const Launch& L, const SgdArgs& a, const float* foundInf) {
  Span sp;
  if (!blockSpan(L, foundInf, sp)) return;
  T* p = static_cast<T*>(L.slot[kSlotParam][sp.t]);
  const T* g = static_cast<const T*>(L.slot[kSlotGrad][sp.t]);
  T* buf = static_cast<T*>(L.slot[2][sp.t]);
  for (i64 i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    float pf = ld(p, i), bf = kMom == Momentum::kLater ? ld(buf, i) : 0.f;
    sgdMath<kL2, kMom, kNesterov>(pf, ld(g, i), bf, a);
    st(p, i, pf);
    if (kMom != Momentum::kNone) st(buf, i, bf);
  }
}
template <class T, bool kL2, Momentum kMom, bool kNesterov>
__global__ void sgdKernel(Launch L, SgdArgs a, const float* foundInf) {
  sgdBody<T, kL2, kMom, kNesterov>(L, a, foundInf);
}
template <class T, bool kL2, Momentum kMom, bool kNesterov>
__global__ void sgdKernelRtc(const Launch* L, const SgdArgs* a, const float* foundInf) {
  sgdBody<T, kL2, kMom, kNesterov>(*L, *a, foundInf);
}

// slot 0 -> slot 1 with a cast and a scale (add: into slot 1). Pack points slot 1 at the
// tensor's place in the flat buffer, unpack slot 0.
template <class S, class D>
__device__ __forceinline__ void convertBody(const Launch& L, float scale, int add) {
  Span sp;
  blockSpan(L, nullptr, sp);
  const S* src = static_cast<const S*>(L.slot[0][sp.t]);
  D* dst = static_cast<D*>(L.slot[1][sp.t]);
  for (i64 i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    const float v = ld(src, i) * scale;
    st(dst, i, add ? ld(dst, i) + v : v);
  }
}
template <class S, class D>
__global__ void convertKernel(Launch L, float scale, int add) { convertBody<S, D>(L, scale, add); }
template <class S, class D>
__global__ void convertKernelRtc(const Launch* L, float scale, int add) { convertBody<S, D>(*L, scale, add); }

// Block-wide sum (double) and max (float, NaN wins) over kThreads threads.
__device__ __forceinline__ void blockReduce(double& sum, float& mx) {
  __shared__ double ssum[kThreads / 32];
  __shared__ float smax[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) {
    sum += __shfl_down_sync(0xffffffffu, sum, o);
    const float other = __shfl_down_sync(0xffffffffu, mx, o);
    mx = (mx >= other || mx != mx) ? mx : other;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    ssum[warp] = sum;
    smax[warp] = mx;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    sum = lane < warps ? ssum[lane] : 0.0;
    mx = lane < warps ? smax[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, o);
      const float other = __shfl_down_sync(0xffffffffu, mx, o);
      mx = (mx >= other || mx != mx) ? mx : other;
    }
  }
}

// Each block's sum of squares and max |x| into partSq/partMax[base + block].
template <class T>
__device__ __forceinline__ void normBody(const Launch& L, double* partSq, float* partMax, int base) {
  Span sp;
  blockSpan(L, nullptr, sp);
  const T* x = static_cast<const T*>(L.slot[0][sp.t]);
  double sum = 0.0;
  float mx = 0.f;
  for (i64 i = sp.begin + threadIdx.x; i < sp.end; i += blockDim.x) {
    const float v = fabsf(ld(x, i));
    sum += double(v) * double(v);
    mx = (mx >= v || mx != mx) ? mx : v;
  }
  blockReduce(sum, mx);
  if (threadIdx.x == 0) {
    partSq[base + blockIdx.x] = sum;
    partMax[base + blockIdx.x] = mx;
  }
}
template <class T>
__global__ void normKernel(Launch L, double* partSq, float* partMax, int base) {
  normBody<T>(L, partSq, partMax, base);
}
template <class T>
__global__ void normKernelRtc(const Launch* L, double* partSq, float* partMax, int base) {
  normBody<T>(*L, partSq, partMax, base);
}

// One block of kThreads: out[0] = sqrt(sum) (l2) or max (inf) over `parts` partials;
// NaN when any element was NaN (a NaN square makes the sum NaN too).
__global__ void normFinishKernel(const double* partSq, const float* partMax, int parts, int inf, float* out) {
  double sum = 0.0;
  float mx = 0.f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    sum += partSq[i];
    const float v = partMax[i];
    mx = (mx >= v || mx != mx) ? mx : v;
  }
  blockReduce(sum, mx);
  if (threadIdx.x == 0) {
    const bool nan = mx != mx || sum != sum;
    out[0] = nan ? __int_as_float(0x7fc00000) : (inf ? mx : float(sqrt(sum)));
  }
}

// ---- bias + GELU -------------------------------------------------------------------

__device__ __forceinline__ float geluOf(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }
__device__ __forceinline__ float geluGrad(float v) {
  const float cdf = 0.5f * (1.f + erff(v * 0.70710678118654752f));
  return cdf + v * 0.39894228040143268f * expf(-0.5f * v * v);
}

// y = gelu(x + b) over rows x n, grid-stride.
template <class T>
__global__ void geluFwdKernel(const T* x, const T* b, T* y, i64 rows, i64 n) {
  const i64 total = rows * n;
  for (i64 i = blockIdx.x * i64(blockDim.x) + threadIdx.x; i < total; i += i64(gridDim.x) * blockDim.x)
    st(y, i, geluOf(ld(x, i) + ld(b, i % n)));
}

// Shared column-reduction tail: the block's kColRows partial sums per column, added in
// shared memory, written to part[blockIdx.y * n + col].
__device__ __forceinline__ void colStore(float acc, float* part, i64 col, i64 n) {
  __shared__ float s[kColRows][kColTile];
  s[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0) {
    float t = 0.f;
    for (int r = 0; r < kColRows; ++r) t += s[r][threadIdx.x];
    if (col < n) part[blockIdx.y * n + col] = t;
  }
}

// dx = dy * gelu'(x + b); db's partial sums per row chunk. Block (kColTile, kColRows),
// grid (ceil(n / kColTile), colChunks(rows)).
template <class T>
__global__ void geluBwdKernel(const T* dy, const T* x, const T* b, T* dx, float* dbPart, i64 rows, i64 n) {
  const i64 col = blockIdx.x * i64(kColTile) + threadIdx.x;
  float acc = 0.f;
  if (col < n) {
    const float bias = ld(b, col);
    for (i64 r = blockIdx.y * i64(kColRows) + threadIdx.y; r < rows; r += i64(gridDim.y) * kColRows) {
      const i64 i = r * n + col;
      const float g = ld(dy, i) * geluGrad(ld(x, i) + bias);
      st(dx, i, g);
      acc += g;
    }
  }
  colStore(acc, dbPart, col, n);
}

// out[col] = sum over chunks of part[chunk * n + col], in chunk order.
template <class T>
__global__ void colSumKernel(const float* part, int chunks, i64 n, T* out) {
  for (i64 c = blockIdx.x * i64(blockDim.x) + threadIdx.x; c < n; c += i64(gridDim.x) * blockDim.x) {
    float t = 0.f;
    for (int k = 0; k < chunks; ++k) t += part[k * n + c];
    st(out, c, t);
  }
}

// ---- LayerNorm ---------------------------------------------------------------------

__device__ __forceinline__ float warpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row (kRowsPerWarpBlock rows per block of 32 x kRowsPerWarpBlock threads):
// mean, then the variance around it (two passes, as torch), y = (x - mean) * rstd * w + b.
// w, b may be null. mean/rstd are float32 per row.
template <class T>
__global__ void lnFwdKernel(const T* x, const T* w, const T* b, T* y, float* mean, float* rstd, i64 rows, int n,
                            float eps) {
  const i64 row = blockIdx.x * i64(kRowsPerWarpBlock) + threadIdx.y;
  if (row >= rows) return;
  const T* xr = x + row * n;
  float s = 0.f;
  for (int c = threadIdx.x; c < n; c += 32) s += ld(xr, c);
  const float mu = warpSum(s) / n;
  float q = 0.f;
  for (int c = threadIdx.x; c < n; c += 32) {
    const float d = ld(xr, c) - mu;
    q += d * d;
  }
  const float rs = rsqrtf(warpSum(q) / n + eps);
  T* yr = y + row * n;
  for (int c = threadIdx.x; c < n; c += 32) {
    float v = (ld(xr, c) - mu) * rs;
    if (w) v *= ld(w, c);
    if (b) v += ld(b, c);
    st(yr, c, v);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// dx per row, one warp each: g = dy * w, dx = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / n).
template <class T>
__global__ void lnBwdKernel(const T* dy, const T* x, const T* w, const float* mean, const float* rstd, T* dx,
                            i64 rows, int n) {
  const i64 row = blockIdx.x * i64(kRowsPerWarpBlock) + threadIdx.y;
  if (row >= rows) return;
  const T* xr = x + row * n;
  const T* dyr = dy + row * n;
  const float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int c = threadIdx.x; c < n; c += 32) {
    const float g = ld(dyr, c) * (w ? ld(w, c) : 1.f);
    sg += g;
    sgx += g * (ld(xr, c) - mu) * rs;
  }
  sg = warpSum(sg);
  sgx = warpSum(sgx);
  T* dxr = dx + row * n;
  for (int c = threadIdx.x; c < n; c += 32) {
    const float g = ld(dyr, c) * (w ? ld(w, c) : 1.f);
    const float xhat = (ld(xr, c) - mu) * rs;
    st(dxr, c, rs * (g - (sg + xhat * sgx) / n));
  }
}

// dweight = sum over rows of dy * xhat, dbias = sum of dy: partial sums per row chunk
// (either pointer may be null). Geometry as geluBwdKernel.
template <class T>
__global__ void lnBwdColKernel(const T* dy, const T* x, const float* mean, const float* rstd, float* dwPart,
                               float* dbPart, i64 rows, i64 n) {
  const i64 col = blockIdx.x * i64(kColTile) + threadIdx.x;
  float aw = 0.f, ab = 0.f;
  if (col < n) {
    for (i64 r = blockIdx.y * i64(kColRows) + threadIdx.y; r < rows; r += i64(gridDim.y) * kColRows) {
      const i64 i = r * n + col;
      const float d = ld(dy, i);
      aw += d * (ld(x, i) - mean[r]) * rstd[r];
      ab += d;
    }
  }
  if (dwPart) colStore(aw, dwPart, col, n);
  __syncthreads();
  if (dbPart) colStore(ab, dbPart, col, n);
}

}  // namespace cuda
}  // namespace kernels
}  // namespace dtrain

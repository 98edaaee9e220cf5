// Bias+GELU and LayerNorm, forward and backward, over a range of rows; included once
// per ISA next to optim_impl.h. Plain loops over a row the compiler vectorises (the
// float erf/exp below are branch-free polynomials for that reason); float64 uses the
// C library's, for gradcheck.

// exp for float: Cody-Waite range reduction and Cephes' polynomial (about 1 ulp).
inline float expPoly(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, e);  // 2^n, built in the exponent bits
}

// erf(x) for float, and exp(-x * x), which it computes on the way: Abramowitz & Stegun
// 7.1.26 (|error| < 1.5e-7), the formula torch's own vectorised CPU erf uses, so GELU matches
// torch's to its rounding. GELU's backward takes the exp too, as the normal density
// (exp(-z^2 / 2) at x = z / sqrt(2)): one exp per element instead of two, in a kernel whose
// time is its arithmetic ([4096, 1024] backward, one thread, EPYC: 4.7 -> 3.4 ms).
inline float erfExpOf(float x, float* ex) {
  const float a = x < 0 ? -x : x;
  const float t = 1.0f / (0.3275911f * a + 1.0f);
  float r = 1.061405429f * t + -1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t + -0.284496736f;
  r = r * t + 0.254829592f;
  *ex = expPoly(-x * x);
  const float e = 1.0f - r * t * *ex;
  return x < 0 ? -e : e;
}
inline double erfExpOf(double x, double* ex) {
  *ex = __builtin_exp(-x * x);
  return __builtin_erf(x);
}
inline float erfOf(float x) {
  float ex;
  return erfExpOf(x, &ex);
}
inline double erfOf(double x) { return __builtin_erf(x); }

// Outputs bigger than the caches are written with streaming (non-temporal) stores: a
// normal store first reads the line it writes (write-allocate), so a row written this
// way moves 2/3 of the bytes. Rows are computed into an L1-resident tile first.
// The caller decides (nn.cc's streamOutput) from the whole call's output size.
constexpr int64_t kTile = 2048;  // elements per tile of a row

inline void storeTile(float* __restrict dst, const float* __restrict src, int64_t n, bool stream) {
  int64_t c = 0;
  if (stream) {
#if defined(DTRAIN_OPT_AVX512)
    for (; c < n && (reinterpret_cast<uintptr_t>(dst + c) & 63); ++c) dst[c] = src[c];
    for (; c + 16 <= n; c += 16) _mm512_stream_ps(dst + c, _mm512_loadu_ps(src + c));
#elif defined(DTRAIN_OPT_F16C)
    for (; c < n && (reinterpret_cast<uintptr_t>(dst + c) & 31); ++c) dst[c] = src[c];
    for (; c + 8 <= n; c += 8) _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
#endif
  }
  for (; c < n; ++c) dst[c] = src[c];
}
inline void storeTile(double* __restrict dst, const double* __restrict src, int64_t n, bool) {
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
}
inline void streamFence(bool stream) {
#if defined(DTRAIN_OPT_AVX512) || defined(DTRAIN_OPT_F16C)
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: publish them before returning
#else
  (void)stream;
#endif
}

template <class T>
void geluFwdRows(const T* __restrict x, const T* __restrict b, T* __restrict y, int64_t r0, int64_t r1, int64_t n,
                 bool stream) {
  const T half = T(0.5), one = T(1), k = T(0.70710678118654752440);
  alignas(64) T tile[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t m = n - c0 < kTile ? n - c0 : kTile;
      for (int64_t c = 0; c < m; ++c) {
        const T z = xr[c0 + c] + b[c0 + c];
        tile[c] = z * half * (one + erfOf(z * k));
      }
      storeTile(yr + c0, tile, m, stream);
    }
  }
  streamFence(stream);
}

// dx = dy * gelu'(x + b); db (one row of `n`, for these rows) += sum of dx over the rows.
template <class T>
void geluBwdRows(const T* __restrict dy, const T* __restrict x, const T* __restrict b, T* __restrict dx,
                 double* __restrict db, int64_t r0, int64_t r1, int64_t n, T* __restrict acc, bool stream) {
  const T half = T(0.5), one = T(1), k = T(0.70710678118654752440), kPdf = T(0.39894228040143267794);
  for (int64_t c = 0; c < n; ++c) acc[c] = 0;
  alignas(64) T tile[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t m = n - c0 < kTile ? n - c0 : kTile;
      for (int64_t c = 0; c < m; ++c) {
        const T z = xr[c0 + c] + b[c0 + c];
        T ex;
        const T cdf = half * (one + erfExpOf(z * k, &ex));
        const T pdf = kPdf * ex;
        const T g = dyr[c0 + c] * (cdf + z * pdf);
        tile[c] = g;
        acc[c0 + c] += g;
      }
      storeTile(dxr + c0, tile, m, stream);
    }
  }
  streamFence(stream);
  for (int64_t c = 0; c < n; ++c) db[c] += acc[c];
}

// A row's float sums on the vector ISAs: four accumulators (four chains of adds in flight,
// where two waited out each add's latency), summed lane by lane in a shuffle tree at the end.
// The compiler's own vectorisation of the 32-lane loops below added the lanes into a scalar
// one after another, a chain of 32 dependent adds per sum: [*, 1024] float32, one thread,
// rows in cache, AMD EPYC: forward 238 -> 162-176 ns a row, backward 361-373 -> 320-326; a
// [4096, 1024] forward+backward against torch's, 3 runs each: 1.20-1.36x -> 1.27-1.40x.
// VecF is a GCC/Clang vector type: +, - and * work on it lane by lane.
#if defined(DTRAIN_OPT_AVX512) || defined(DTRAIN_OPT_F16C)
#define DTRAIN_VEC_SUMS 1
inline float sum8(__m256 a) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
#endif
#if defined(DTRAIN_OPT_AVX512)
using VecF = __m512;
constexpr int kVecF = 16;
inline VecF vLoad(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vSet(float x) { return _mm512_set1_ps(x); }
inline VecF vFma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vSum(VecF a) { return sum8(_mm512_castps512_ps256(a) + _mm512_extractf32x8_ps(a, 1)); }
#elif defined(DTRAIN_OPT_F16C)
using VecF = __m256;
constexpr int kVecF = 8;
inline VecF vLoad(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vSet(float x) { return _mm256_set1_ps(x); }
inline VecF vFma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vSum(VecF a) { return sum8(a); }
#endif

#if defined(DTRAIN_VEC_SUMS)
// lnRowStats for float rows: sum, then the deviations' squares (fused multiply-adds, as the
// forward allows), each over four vectors of lanes.
inline void lnRowStatsVec(const float* __restrict x, int64_t n, double eps, float* mu, float* rs) {
  constexpr int kStep = 4 * kVecF;
  VecF a0 = vSet(0.f), a1 = a0, a2 = a0, a3 = a0;
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    a0 += vLoad(x + c);
    a1 += vLoad(x + c + kVecF);
    a2 += vLoad(x + c + 2 * kVecF);
    a3 += vLoad(x + c + 3 * kVecF);
  }
  for (; c + kVecF <= n; c += kVecF) a0 += vLoad(x + c);
  float s = vSum((a0 + a1) + (a2 + a3));
  for (; c < n; ++c) s += x[c];
  const float m = s / static_cast<float>(n);
  const VecF vm = vSet(m);
  a0 = a1 = a2 = a3 = vSet(0.f);
  for (c = 0; c + kStep <= n; c += kStep) {
    const VecF d0 = vLoad(x + c) - vm, d1 = vLoad(x + c + kVecF) - vm, d2 = vLoad(x + c + 2 * kVecF) - vm,
               d3 = vLoad(x + c + 3 * kVecF) - vm;
    a0 = vFma(d0, d0, a0);
    a1 = vFma(d1, d1, a1);
    a2 = vFma(d2, d2, a2);
    a3 = vFma(d3, d3, a3);
  }
  for (; c + kVecF <= n; c += kVecF) {
    const VecF d = vLoad(x + c) - vm;
    a0 = vFma(d, d, a0);
  }
  float v = vSum((a0 + a1) + (a2 + a3));
  for (; c < n; ++c) {
    const float d = x[c] - m;
    v += d * d;
  }
  *mu = m;
  *rs = static_cast<float>(1.0 / __builtin_sqrt(static_cast<double>(v) / n + eps));
}
#endif

// The forward lets the compiler fuse multiply-adds (fp-contract=fast; the build's -std=c++17
// turns contraction off): the variance's d * d + v and the output's (x - mu) * rs * w + b
// take one instruction fewer per vector, and stay within torch's rounding of the same
// formula (tests: 1e-5). The backward keeps it off; see lnBwdColumns.
#define DTRAIN_FUSE_MULADD __attribute__((optimize("fp-contract=fast")))

// Mean and 1/std of one row, in two passes (the deviations' pass keeps the variance free of
// cancellation). float rows on AVX2 and AVX-512: lnRowStatsVec. Otherwise each pass sums into
// 128 bytes of lanes, two vectors' worth: two chains of adds that overlap, where one
// accumulator would wait out every add's latency.
template <class T>
DTRAIN_FUSE_MULADD inline void lnRowStats(const T* __restrict x, int64_t n, double eps, T* mu, T* rs) {
#if defined(DTRAIN_VEC_SUMS)
  if constexpr (sizeof(T) == 4) return lnRowStatsVec(x, n, eps, mu, rs);
#endif
  constexpr int kLanes = 128 / sizeof(T);
  T acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += x[c + k];
  T s = 0;
  for (; c < n; ++c) s += x[c];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  const T m = s / static_cast<T>(n);
  T dev[kLanes] = {};
  for (c = 0; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const T d = x[c + k] - m;
      dev[k] += d * d;
    }
  T v = 0;
  for (; c < n; ++c) {
    const T d = x[c] - m;
    v += d * d;
  }
  for (int k = 0; k < kLanes; ++k) v += dev[k];
  *mu = m;
  *rs = static_cast<T>(1.0 / __builtin_sqrt(static_cast<double>(v) / n + eps));
}

// y = (x - mu) * rs * w + b over one row (w, b optional), stored straight into y; with
// `stream`, float rows go out through non-temporal stores from the first 64-byte boundary.
template <class T>
DTRAIN_FUSE_MULADD inline void lnRowOut(const T* __restrict x, const T* __restrict w, const T* __restrict b,
                                        T* __restrict y, int64_t n, T mu, T rs, bool stream) {
  int64_t c = 0;
#if defined(DTRAIN_OPT_AVX512)
  if constexpr (sizeof(T) == 4) {
    if (stream) {
      for (; c < n && (reinterpret_cast<uintptr_t>(y + c) & 63); ++c)
        y[c] = (x[c] - mu) * rs * (w ? w[c] : T(1)) + (b ? b[c] : T(0));
      const __m512 m = _mm512_set1_ps(mu), r = _mm512_set1_ps(rs), one = _mm512_set1_ps(1.f),
                   zero = _mm512_setzero_ps();
      for (; c + 16 <= n; c += 16) {
        const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), m), r);
        _mm512_stream_ps(y + c, _mm512_fmadd_ps(xh, w ? _mm512_loadu_ps(w + c) : one,
                                                b ? _mm512_loadu_ps(b + c) : zero));
      }
    }
  }
#elif defined(DTRAIN_OPT_F16C)
  if constexpr (sizeof(T) == 4) {
    if (stream) {
      for (; c < n && (reinterpret_cast<uintptr_t>(y + c) & 31); ++c)
        y[c] = (x[c] - mu) * rs * (w ? w[c] : T(1)) + (b ? b[c] : T(0));
      const __m256 m = _mm256_set1_ps(mu), r = _mm256_set1_ps(rs), one = _mm256_set1_ps(1.f),
                   zero = _mm256_setzero_ps();
      for (; c + 8 <= n; c += 8) {
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), m), r);
        _mm256_stream_ps(y + c, _mm256_fmadd_ps(xh, w ? _mm256_loadu_ps(w + c) : one,
                                                b ? _mm256_loadu_ps(b + c) : zero));
      }
    }
  }
#endif
  if (w && b) {
    for (; c < n; ++c) y[c] = (x[c] - mu) * rs * w[c] + b[c];
  } else if (w) {
    for (; c < n; ++c) y[c] = (x[c] - mu) * rs * w[c];
  } else {
    for (; c < n; ++c) y[c] = (x[c] - mu) * rs;
  }
}

// One row at a time, start to end. Four rows' sums in one loop (four chains) and rows staged
// in an L1 tile before a separate store pass measured slower once the data comes from memory:
// [4096, 1024] float32, one thread, caches flushed first, AMD EPYC: 1.95 -> 1.46 ms.
template <class T>
void lnFwdRows(const T* __restrict x, const T* __restrict w, const T* __restrict b, T* __restrict y,
               T* __restrict mean, T* __restrict rstd, int64_t r0, int64_t r1, int64_t n, double eps, bool stream) {
  for (int64_t r = r0; r < r1; ++r) {
    lnRowStats(x + r * n, n, eps, mean + r, rstd + r);
    lnRowOut(x + r * n, w, b, y + r * n, n, mean[r], rstd[r], stream);
  }
  streamFence(stream);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw += sum dy * xhat,
// db += sum dy over these rows (accumulated per column in T, then into the doubles).
// One row at a time, in two passes: its two sums, then dx and the column sums. Four rows
// together (their sums in one loop, then one pass over the columns writing all four, so the
// column sums were loaded and stored once per four rows) measured slower once dy and x come
// from memory: [4096, 1024] float32, one thread, caches flushed first, AMD EPYC: 3.1 -> 1.8 ms.
//
// fp-contract=off: g = dy * w must round in the second pass exactly as it did in the sums (a
// fused multiply-add into g - mean(g) would keep its low bits, so a row of one element, whose
// g - mean(g) is exactly 0, would get a gradient from the rounding residue); the vector body
// below rounds every product as the scalar loops do, so a row's result does not depend on
// where its vectors start.
#define DTRAIN_NO_MULADD __attribute__((optimize("fp-contract=off")))

#if defined(DTRAIN_VEC_SUMS)
// lnRowGradSums for float rows: each sum over two vectors of lanes (four chains in all), every
// product rounded on its own as lnRowGrad's second pass rounds it.
DTRAIN_NO_MULADD inline void lnRowGradSumsVec(const float* __restrict dy, const float* __restrict x,
                                              const float* __restrict w, int64_t n, float mu, float rs, float* mg,
                                              float* mgx) {
  const VecF vm = vSet(mu), vr = vSet(rs), one = vSet(1.f);
  VecF g0 = vSet(0.f), g1 = g0, h0 = g0, h1 = g0;
  int64_t c = 0;
  for (; c + 2 * kVecF <= n; c += 2 * kVecF) {
    const VecF ga = vLoad(dy + c) * (w ? vLoad(w + c) : one);
    const VecF gb = vLoad(dy + c + kVecF) * (w ? vLoad(w + c + kVecF) : one);
    g0 += ga;
    g1 += gb;
    h0 += ga * ((vLoad(x + c) - vm) * vr);
    h1 += gb * ((vLoad(x + c + kVecF) - vm) * vr);
  }
  for (; c + kVecF <= n; c += kVecF) {
    const VecF g = vLoad(dy + c) * (w ? vLoad(w + c) : one);
    g0 += g;
    h0 += g * ((vLoad(x + c) - vm) * vr);
  }
  float sg = vSum(g0 + g1), sgx = vSum(h0 + h1);
  for (; c < n; ++c) {
    const float g = dy[c] * (w ? w[c] : 1.f);
    sg += g;
    sgx += g * ((x[c] - mu) * rs);
  }
  *mg = sg / static_cast<float>(n);
  *mgx = sgx / static_cast<float>(n);
}
#endif

// mean(g) and mean(g * xhat) of one row, each summed in 128 bytes of lanes (two chains);
// float rows on AVX2 and AVX-512: lnRowGradSumsVec.
template <class T>
DTRAIN_NO_MULADD inline void lnRowGradSums(const T* __restrict dy, const T* __restrict x, const T* __restrict w,
                                           int64_t n, T mu, T rs, T* mg, T* mgx) {
#if defined(DTRAIN_VEC_SUMS)
  if constexpr (sizeof(T) == 4) return lnRowGradSumsVec(dy, x, w, n, mu, rs, mg, mgx);
#endif
  constexpr int kLanes = 128 / sizeof(T);
  T ag[kLanes] = {}, agx[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int k = 0; k < kLanes; ++k) {
      const T g = dy[c + k] * (w ? w[c + k] : T(1));
      ag[k] += g;
      agx[k] += g * ((x[c + k] - mu) * rs);
    }
  T sg = 0, sgx = 0;
  for (; c < n; ++c) {
    const T g = dy[c] * (w ? w[c] : T(1));
    sg += g;
    sgx += g * ((x[c] - mu) * rs);
  }
  for (int k = 0; k < kLanes; ++k) {
    sg += ag[k];
    sgx += agx[k];
  }
  *mg = sg / static_cast<T>(n);
  *mgx = sgx / static_cast<T>(n);
}

// dx of one row, stored straight into dx (float rows with `stream`: non-temporal stores from
// the first 64-byte boundary), and its dy * xhat and dy added into the column sums. This pass
// reads dy and x from L1, so the memory would sit idle under it: it prefetches the next row's
// dy and x (nextDy/nextX, a line of each per vector), which the next row's sums then find in
// cache. [4096, 1024] float32 fwd+bwd against torch, 4 alternating rounds: one thread
// 1.12-1.20x -> 1.26-1.30x, two 1.21-1.29x -> 1.38-1.61x. The same in the forward's output
// pass measured no gain, and processing the backward's rows last to first (to find the
// forward's latest rows of x in L3) measured far slower.
template <class T>
DTRAIN_NO_MULADD inline void lnRowGrad(const T* __restrict dy, const T* __restrict x, const T* __restrict w,
                                       T* __restrict dx, T* __restrict accW, T* __restrict accB, int64_t n, T mu,
                                       T rs, T mg, T mgx, bool stream, const T* nextDy = nullptr,
                                       const T* nextX = nullptr) {
  auto one = [&](int64_t c) {
    const T d = dy[c];
    const T xh = (x[c] - mu) * rs;
    const T g = d * (w ? w[c] : T(1));
    dx[c] = rs * ((g - mg) - xh * mgx);
    accW[c] += d * xh;
    accB[c] += d;
  };
  int64_t c = 0;
#if defined(DTRAIN_OPT_AVX512)
  if constexpr (sizeof(T) == 4) {
    if (stream) {
      for (; c < n && (reinterpret_cast<uintptr_t>(dx + c) & 63); ++c) one(c);
      const __m512 m = _mm512_set1_ps(mu), r = _mm512_set1_ps(rs), vg = _mm512_set1_ps(mg),
                   vgx = _mm512_set1_ps(mgx), ones = _mm512_set1_ps(1.f);
      for (; c + 16 <= n; c += 16) {
        if (nextDy) {
          _mm_prefetch(reinterpret_cast<const char*>(nextDy + c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nextX + c), _MM_HINT_T0);
        }
        const __m512 d = _mm512_loadu_ps(dy + c);
        const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), m), r);
        const __m512 g = _mm512_mul_ps(d, w ? _mm512_loadu_ps(w + c) : ones);
        _mm512_stream_ps(dx + c, _mm512_mul_ps(r, _mm512_sub_ps(_mm512_sub_ps(g, vg), _mm512_mul_ps(xh, vgx))));
        _mm512_storeu_ps(accW + c, _mm512_add_ps(_mm512_loadu_ps(accW + c), _mm512_mul_ps(d, xh)));
        _mm512_storeu_ps(accB + c, _mm512_add_ps(_mm512_loadu_ps(accB + c), d));
      }
    }
  }
#elif defined(DTRAIN_OPT_F16C)
  if constexpr (sizeof(T) == 4) {
    if (stream) {
      for (; c < n && (reinterpret_cast<uintptr_t>(dx + c) & 31); ++c) one(c);
      const __m256 m = _mm256_set1_ps(mu), r = _mm256_set1_ps(rs), vg = _mm256_set1_ps(mg),
                   vgx = _mm256_set1_ps(mgx), ones = _mm256_set1_ps(1.f);
      for (; c + 8 <= n; c += 8) {
        if (nextDy) {  // twice per line: the second finds it in flight
          _mm_prefetch(reinterpret_cast<const char*>(nextDy + c), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(nextX + c), _MM_HINT_T0);
        }
        const __m256 d = _mm256_loadu_ps(dy + c);
        const __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + c), m), r);
        const __m256 g = _mm256_mul_ps(d, w ? _mm256_loadu_ps(w + c) : ones);
        _mm256_stream_ps(dx + c, _mm256_mul_ps(r, _mm256_sub_ps(_mm256_sub_ps(g, vg), _mm256_mul_ps(xh, vgx))));
        _mm256_storeu_ps(accW + c, _mm256_add_ps(_mm256_loadu_ps(accW + c), _mm256_mul_ps(d, xh)));
        _mm256_storeu_ps(accB + c, _mm256_add_ps(_mm256_loadu_ps(accB + c), d));
      }
    }
  }
#endif
#pragma omp simd
  for (int64_t k = c; k < n; ++k) one(k);
}

template <class T>
void lnBwdRows(const T* __restrict dy, const T* __restrict x, const T* __restrict w, const T* __restrict mean,
               const T* __restrict rstd, T* __restrict dx, double* __restrict dw, double* __restrict db, int64_t r0,
               int64_t r1, int64_t n, T* __restrict accW, T* __restrict accB, bool stream) {
  for (int64_t c = 0; c < n; ++c) accW[c] = accB[c] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const T *dyr = dy + r * n, *xr = x + r * n;
    T mg, mgx;
    lnRowGradSums(dyr, xr, w, n, mean[r], rstd[r], &mg, &mgx);
    const bool next = r + 1 < r1;
    lnRowGrad(dyr, xr, w, dx + r * n, accW, accB, n, mean[r], rstd[r], mg, mgx, stream, next ? dyr + n : nullptr,
              next ? xr + n : nullptr);
  }
  streamFence(stream);
  for (int64_t c = 0; c < n; ++c) {
    dw[c] += accW[c];
    db[c] += accB[c];
  }
}

// Entry points taking the element type at run time (float32 or float64).
void geluFwd(DType dt, const void* x, const void* b, void* y, int64_t r0, int64_t r1, int64_t n, bool stream) {
  if (dt == DType::kFloat64)
    return geluFwdRows(static_cast<const double*>(x), static_cast<const double*>(b), static_cast<double*>(y), r0, r1, n,
                       stream);
  geluFwdRows(static_cast<const float*>(x), static_cast<const float*>(b), static_cast<float*>(y), r0, r1, n, stream);
}

void geluBwd(DType dt, const void* dy, const void* x, const void* b, void* dx, double* db, int64_t r0, int64_t r1,
             int64_t n, void* scratch, bool stream) {
  if (dt == DType::kFloat64)
    return geluBwdRows(static_cast<const double*>(dy), static_cast<const double*>(x), static_cast<const double*>(b),
                       static_cast<double*>(dx), db, r0, r1, n, static_cast<double*>(scratch), stream);
  geluBwdRows(static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<const float*>(b),
              static_cast<float*>(dx), db, r0, r1, n, static_cast<float*>(scratch), stream);
}

void lnFwd(DType dt, const void* x, const void* w, const void* b, void* y, void* mean, void* rstd, int64_t r0,
           int64_t r1, int64_t n, double eps, bool stream) {
  if (dt == DType::kFloat64)
    return lnFwdRows(static_cast<const double*>(x), static_cast<const double*>(w), static_cast<const double*>(b),
                     static_cast<double*>(y), static_cast<double*>(mean), static_cast<double*>(rstd), r0, r1, n, eps,
                     stream);
  lnFwdRows(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<const float*>(b),
            static_cast<float*>(y), static_cast<float*>(mean), static_cast<float*>(rstd), r0, r1, n, eps, stream);
}

void lnBwd(DType dt, const void* dy, const void* x, const void* w, const void* mean, const void* rstd, void* dx,
           double* dw, double* db, int64_t r0, int64_t r1, int64_t n, void* scratch, bool stream) {
  if (dt == DType::kFloat64) {
    auto* s = static_cast<double*>(scratch);
    return lnBwdRows(static_cast<const double*>(dy), static_cast<const double*>(x), static_cast<const double*>(w),
                     static_cast<const double*>(mean), static_cast<const double*>(rstd), static_cast<double*>(dx), dw,
                     db, r0, r1, n, s, s + n, stream);
  }
  auto* s = static_cast<float*>(scratch);
  lnBwdRows(static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<const float*>(w),
            static_cast<const float*>(mean), static_cast<const float*>(rstd), static_cast<float*>(dx), dw, db, r0, r1,
            n, s, s + n, stream);
}

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

// erf for float: Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula torch's own
// vectorised CPU erf uses, so GELU matches torch's to its rounding.
inline float erfPoly(float x) {
  const float a = x < 0 ? -x : x;
  const float t = 1.0f / (0.3275911f * a + 1.0f);
  float r = 1.061405429f * t + -1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t + -0.284496736f;
  r = r * t + 0.254829592f;
  const float e = 1.0f - r * t * expPoly(-x * x);
  return x < 0 ? -e : e;
}

inline float erfOf(float x) { return erfPoly(x); }
inline double erfOf(double x) { return __builtin_erf(x); }
inline float expOf(float x) { return expPoly(x); }
inline double expOf(double x) { return __builtin_exp(x); }

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
        const T cdf = half * (one + erfOf(z * k));
        const T pdf = kPdf * expOf(-half * z * z);
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

template <class T>
void lnFwdRows(const T* __restrict x, const T* __restrict w, const T* __restrict b, T* __restrict y,
               T* __restrict mean, T* __restrict rstd, int64_t r0, int64_t r1, int64_t n, double eps, bool stream) {
  alignas(64) T tile[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    // Two passes in the element type's vector lanes (each lane sums n/16 values; the
    // deviations' pass keeps the variance free of cancellation).
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < n; ++c) s += xr[c];
    const T mu = s / static_cast<T>(n);
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < n; ++c) {
      const T d = xr[c] - mu;
      v += d * d;
    }
    const T rs = static_cast<T>(1.0 / __builtin_sqrt(static_cast<double>(v) / n + eps));
    mean[r] = mu;
    rstd[r] = rs;
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t m = n - c0 < kTile ? n - c0 : kTile;
      const T* xt = xr + c0;
      if (w && b) {
        for (int64_t c = 0; c < m; ++c) tile[c] = (xt[c] - mu) * rs * w[c0 + c] + b[c0 + c];
      } else if (w) {
        for (int64_t c = 0; c < m; ++c) tile[c] = (xt[c] - mu) * rs * w[c0 + c];
      } else {
        for (int64_t c = 0; c < m; ++c) tile[c] = (xt[c] - mu) * rs;
      }
      storeTile(yr + c0, tile, m, stream);
    }
  }
  streamFence(stream);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw += sum dy * xhat,
// db += sum dy over these rows (accumulated per row in T, then into the doubles).
template <class T>
void lnBwdRows(const T* __restrict dy, const T* __restrict x, const T* __restrict w, const T* __restrict mean,
               const T* __restrict rstd, T* __restrict dx, double* __restrict dw, double* __restrict db, int64_t r0,
               int64_t r1, int64_t n, T* __restrict accW, T* __restrict accB, T* __restrict gs, bool stream) {
  for (int64_t c = 0; c < n; ++c) accW[c] = accB[c] = 0;
  alignas(64) T tile[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    const T mu = mean[r], rs = rstd[r];
    T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < n; ++c) {
      const T xh = (xr[c] - mu) * rs;
      const T g = w ? dyr[c] * w[c] : dyr[c];
      gs[c] = g;  // stored, so the second loop sees the same rounded g (no fused multiply-add)
      sg += g;
      sgx += g * xh;
      accW[c] += dyr[c] * xh;
      accB[c] += dyr[c];
    }
    const T mg = sg / static_cast<T>(n), mgx = sgx / static_cast<T>(n);
    for (int64_t c0 = 0; c0 < n; c0 += kTile) {
      const int64_t m = n - c0 < kTile ? n - c0 : kTile;
      for (int64_t c = 0; c < m; ++c) {
        const T xh = (xr[c0 + c] - mu) * rs;
        tile[c] = rs * ((gs[c0 + c] - mg) - xh * mgx);
      }
      storeTile(dxr + c0, tile, m, stream);
    }
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
                     db, r0, r1, n, s, s + n, s + 2 * n, stream);
  }
  auto* s = static_cast<float*>(scratch);
  lnBwdRows(static_cast<const float*>(dy), static_cast<const float*>(x), static_cast<const float*>(w),
            static_cast<const float*>(mean), static_cast<const float*>(rstd), static_cast<float*>(dx), dw, db, r0, r1,
            n, s, s + n, s + 2 * n, stream);
}

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

// Rows go kLnRows at a time through their reductions: a sum over one row is a single chain
// of dependent vector adds that waits out each add's latency, four rows' sums in one loop
// are four chains that overlap. Per row, the lanes add in the order one row alone would.
constexpr int kLnRows = 4;
constexpr int64_t kLnChunk = 512;  // columns per tile when kLnRows rows write together

// The forward lets the compiler fuse multiply-adds (fp-contract=fast; the build's -std=c++17
// turns contraction off): the variance's d * d + v and the output's (x - mu) * rs * w + b
// take one instruction fewer per vector, and stay within torch's rounding of the same
// formula (tests: 1e-5). The backward keeps it off; see lnBwdColumns.
// [4096, 1024] float32 forward, one thread: 0.82 -> 0.64 ms.
#define DTRAIN_FUSE_MULADD __attribute__((optimize("fp-contract=fast")))

// Mean and 1/std of rows xp[0..R): two passes in the element type's vector lanes (the
// deviations' pass keeps the variance free of cancellation).
template <class T>
DTRAIN_FUSE_MULADD void lnStats(const T* const* xp, int rows, int64_t n, double eps, T* mu, T* rs) {
  if (rows == kLnRows) {
    const T *x0 = xp[0], *x1 = xp[1], *x2 = xp[2], *x3 = xp[3];
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < n; ++c) {
      s0 += x0[c];
      s1 += x1[c];
      s2 += x2[c];
      s3 += x3[c];
    }
    const T m0 = s0 / static_cast<T>(n), m1 = s1 / static_cast<T>(n), m2 = s2 / static_cast<T>(n),
            m3 = s3 / static_cast<T>(n);
    T v0 = 0, v1 = 0, v2 = 0, v3 = 0;
#pragma omp simd reduction(+ : v0, v1, v2, v3)
    for (int64_t c = 0; c < n; ++c) {
      const T d0 = x0[c] - m0, d1 = x1[c] - m1, d2 = x2[c] - m2, d3 = x3[c] - m3;
      v0 += d0 * d0;
      v1 += d1 * d1;
      v2 += d2 * d2;
      v3 += d3 * d3;
    }
    const T m[kLnRows] = {m0, m1, m2, m3}, v[kLnRows] = {v0, v1, v2, v3};
    for (int i = 0; i < kLnRows; ++i) {
      mu[i] = m[i];
      rs[i] = static_cast<T>(1.0 / __builtin_sqrt(static_cast<double>(v[i]) / n + eps));
    }
    return;
  }
  for (int i = 0; i < rows; ++i) {
    const T* xr = xp[i];
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < n; ++c) s += xr[c];
    const T m = s / static_cast<T>(n);
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t c = 0; c < n; ++c) {
      const T d = xr[c] - m;
      v += d * d;
    }
    mu[i] = m;
    rs[i] = static_cast<T>(1.0 / __builtin_sqrt(static_cast<double>(v) / n + eps));
  }
}

// Rows of 4 KiB are pages of their own, and the hardware prefetchers stop at a page's end:
// each new row would start with misses at full memory latency. The forward asks for the next
// group's rows while it works on this one (forward, data not cached: 0.95 -> 0.75 ms). In
// the backward, which reads two such rows per row, the same burst measured slower on an Intel
// (1.44 -> 1.7 ms, into L1 or L2 alike) and no faster on an AMD EPYC (2.0-2.3 ms either way),
// so it runs without.
template <class T>
inline void prefetchRows(const T* base, int64_t r, int64_t r1, int64_t n) {
  const int64_t end = (r1 - r < kLnRows ? r1 : r + kLnRows) * n;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t e = r * n; e < end; e += kLine) __builtin_prefetch(base + e, 0, 3);
}

template <class T>
DTRAIN_FUSE_MULADD void lnFwdRows(const T* __restrict x, const T* __restrict w, const T* __restrict b,
                                  T* __restrict y, T* __restrict mean, T* __restrict rstd, int64_t r0, int64_t r1,
                                  int64_t n, double eps, bool stream) {
  alignas(64) T tile[kTile];
  for (int64_t r = r0; r < r1; r += kLnRows) {
    const int rows = r1 - r < kLnRows ? static_cast<int>(r1 - r) : kLnRows;
    const T* xp[kLnRows];
    for (int i = 0; i < rows; ++i) xp[i] = x + (r + i) * n;
    if (r + kLnRows < r1) prefetchRows(x, r + kLnRows, r1, n);
    lnStats(xp, rows, n, eps, mean + r, rstd + r);
    for (int i = 0; i < rows; ++i) {
      const T* xr = xp[i];
      T* yr = y + (r + i) * n;
      const T mu = mean[r + i], rs = rstd[r + i];
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
  }
  streamFence(stream);
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w; dw += sum dy * xhat,
// db += sum dy over these rows (accumulated per row in T, then into the doubles).
// Rows go kLnRows at a time: one pass for their sums (lnGradSums), then one pass over the
// columns that writes every row's dx and adds all of them into dw/db, so the accumulators
// are loaded and stored once per kLnRows rows (they were the loop's busiest ports) and g is
// never stored. Per column the rows are added in order, as one row at a time would.

// mean(g) and mean(g * xhat) per row, g = dy * w. One row at a time: unlike the forward's
// sums, four rows in one loop measured slower here (1.5 against 1.35 ms for [4096, 1024]).
template <class T>
void lnGradSums(const T* const* dyp, const T* const* xp, const T* __restrict w, const T* mu, const T* rs, int rows,
                int64_t n, T* mg, T* mgx) {
  for (int i = 0; i < rows; ++i) {
    const T* dyr = dyp[i];
    const T* xr = xp[i];
    const T m0 = mu[i], s0 = rs[i];
    T sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < n; ++c) {
      const T g = dyr[c] * (w ? w[c] : T(1));
      sg += g;
      sgx += g * ((xr[c] - m0) * s0);
    }
    mg[i] = sg / static_cast<T>(n);
    mgx[i] = sgx / static_cast<T>(n);
  }
}

// fp-contract=off: g = dy * w must round exactly as it did in the row sums (a fused
// multiply-add into g - mean(g) would keep its low bits, so a row of one element, whose
// g - mean(g) is exactly 0, would get a gradient from the rounding residue).
template <class T, int R>
__attribute__((optimize("fp-contract=off"))) void lnBwdColumns(const T* const* dyp, const T* const* xp, const T* __restrict w, const T* mu, const T* rs,
                  const T* mg, const T* mgx, T* const* dxp, T* __restrict accW, T* __restrict accB, int64_t n,
                  bool stream) {
  alignas(64) T tile[R][kLnChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kLnChunk) {
    const int64_t m = n - c0 < kLnChunk ? n - c0 : kLnChunk;
#pragma omp simd
    for (int64_t c = 0; c < m; ++c) {
      const T wc = w ? w[c0 + c] : T(1);
      T aw = accW[c0 + c], ab = accB[c0 + c];
      for (int i = 0; i < R; ++i) {
        const T d = dyp[i][c0 + c];
        const T xh = (xp[i][c0 + c] - mu[i]) * rs[i];
        const T g = d * wc;
        tile[i][c] = rs[i] * ((g - mg[i]) - xh * mgx[i]);
        aw += d * xh;
        ab += d;
      }
      accW[c0 + c] = aw;
      accB[c0 + c] = ab;
    }
    for (int i = 0; i < R; ++i) storeTile(dxp[i] + c0, tile[i], m, stream);
  }
}

template <class T>
void lnBwdRows(const T* __restrict dy, const T* __restrict x, const T* __restrict w, const T* __restrict mean,
               const T* __restrict rstd, T* __restrict dx, double* __restrict dw, double* __restrict db, int64_t r0,
               int64_t r1, int64_t n, T* __restrict accW, T* __restrict accB, bool stream) {
  for (int64_t c = 0; c < n; ++c) accW[c] = accB[c] = 0;
  for (int64_t r = r0; r < r1; r += kLnRows) {
    const int rows = r1 - r < kLnRows ? static_cast<int>(r1 - r) : kLnRows;
    const T* dyp[kLnRows];
    const T* xp[kLnRows];
    T* dxp[kLnRows];
    T mu[kLnRows], rs[kLnRows], mg[kLnRows], mgx[kLnRows];
    for (int i = 0; i < rows; ++i) {
      dyp[i] = dy + (r + i) * n;
      xp[i] = x + (r + i) * n;
      dxp[i] = dx + (r + i) * n;
      mu[i] = mean[r + i];
      rs[i] = rstd[r + i];
    }
    lnGradSums(dyp, xp, w, mu, rs, rows, n, mg, mgx);
    if (rows == kLnRows)
      lnBwdColumns<T, kLnRows>(dyp, xp, w, mu, rs, mg, mgx, dxp, accW, accB, n, stream);
    else
      for (int i = 0; i < rows; ++i)
        lnBwdColumns<T, 1>(dyp + i, xp + i, w, mu + i, rs + i, mg + i, mgx + i, dxp + i, accW, accB, n, stream);
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

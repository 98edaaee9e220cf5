// Tensor-fusion loops (pack with cast and scale, unpack with cast, scale and add,
// norms), included once per ISA next to optim_impl.h.

template <class S, class D>
void castLoop(D* __restrict d, const S* __restrict s, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) store(d[i], toFloat(s[i]) * scale);
}

template <class S, class D>
void addLoop(D* __restrict d, const S* __restrict s, int64_t n, float scale) {
  for (int64_t i = 0; i < n; ++i) store(d[i], toFloat(d[i]) + toFloat(s[i]) * scale);
}

template <class S, class D>
void castOrAdd(void* d, const void* s, int64_t n, float scale, bool add) {
  if (add)
    addLoop(static_cast<D*>(d), static_cast<const S*>(s), n, scale);
  else
    castLoop(static_cast<D*>(d), static_cast<const S*>(s), n, scale);
}

template <class S>
void castFrom(DType dd, void* d, const void* s, int64_t n, float scale, bool add) {
  switch (dd) {
    case DType::kFloat16: return castOrAdd<S, F16>(d, s, n, scale, add);
    case DType::kBFloat16: return castOrAdd<S, BF16>(d, s, n, scale, add);
    default: return castOrAdd<S, float>(d, s, n, scale, add);
  }
}

// float32 <-> fp16 with the CPU's conversion instructions where it has them (they round
// to nearest even, as floatToHalf does, so every ISA gives the same bits). With `stream`
// the fp16 output skips the caches (a normal store reads each line before writing it: a
// third more traffic for a buffer larger than the caches, which its reader will not find
// there anyway).
inline void f32ToF16(uint16_t* __restrict d, const float* __restrict s, int64_t n, float scale, bool stream) {
  int64_t i = 0;
#if defined(DTRAIN_OPT_AVX512)
  const __m512 sc = _mm512_set1_ps(scale);
  if (stream) {
    for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 31); ++i) d[i] = floatToHalf(s[i] * scale);
    for (; i + 16 <= n; i += 16)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(s + i), sc), _MM_FROUND_TO_NEAREST_INT));
    _mm_sfence();  // weakly ordered: publish before returning
  }
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(s + i), sc), _MM_FROUND_TO_NEAREST_INT));
  if (i < n) {  // the last 1-15 under a mask: a pack of many small tensors has a tail per tensor
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(d + i, m,
                             _mm512_cvtps_ph(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), sc),
                                             _MM_FROUND_TO_NEAREST_INT));
    i = n;
  }
#elif defined(DTRAIN_OPT_F16C)
  const __m256 sc = _mm256_set1_ps(scale);
  if (stream) {
    for (; i < n && (reinterpret_cast<uintptr_t>(d + i) & 15); ++i) d[i] = floatToHalf(s[i] * scale);
    for (; i + 8 <= n; i += 8)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(s + i), sc), _MM_FROUND_TO_NEAREST_INT));
    _mm_sfence();
  }
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(s + i), sc), _MM_FROUND_TO_NEAREST_INT));
#else
  (void)stream;
#endif
  for (; i < n; ++i) d[i] = floatToHalf(s[i] * scale);
}

inline void f16ToF32(float* __restrict d, const uint16_t* __restrict s, int64_t n, float scale, bool add) {
  int64_t i = 0;
#if defined(DTRAIN_OPT_AVX512)
  const __m512 sc = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))), sc);
    if (add) v = _mm512_add_ps(_mm512_loadu_ps(d + i), v);
    _mm512_storeu_ps(d + i, v);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 v = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)), sc);
    if (add) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, d + i), v);
    _mm512_mask_storeu_ps(d + i, m, v);
    i = n;
  }
#elif defined(DTRAIN_OPT_F16C)
  const __m256 sc = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))), sc);
    if (add) v = _mm256_add_ps(_mm256_loadu_ps(d + i), v);
    _mm256_storeu_ps(d + i, v);
  }
#endif
  for (; i < n; ++i) d[i] = (add ? d[i] : 0.f) + halfToFloat(s[i]) * scale;
}

// d = cast(s * scale), or d = cast(d + s * scale) when `add`; any pair of float32/fp16/bf16.
void convert(DType dd, void* d, DType sd, const void* s, int64_t n, float scale, bool add, bool stream) {
  if (sd == DType::kFloat32 && dd == DType::kFloat16 && !add)
    return f32ToF16(static_cast<uint16_t*>(d), static_cast<const float*>(s), n, scale, stream);
  if (sd == DType::kFloat16 && dd == DType::kFloat32)
    return f16ToF32(static_cast<float*>(d), static_cast<const uint16_t*>(s), n, scale, add);
  switch (sd) {
    case DType::kFloat16: return castFrom<F16>(dd, d, s, n, scale, add);
    case DType::kBFloat16: return castFrom<BF16>(dd, d, s, n, scale, add);
    default: return castFrom<float>(dd, d, s, n, scale, add);
  }
}

// Sum of squares in double (8 independent lanes, so the loop vectorises) and max |x|,
// with NaN reported apart (a max would drop it).
template <class T>
NormPart normLoop(const T* __restrict x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float mx[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) {
      const float v = toFloat(x[i + k]);
      acc[k] += static_cast<double>(v) * v;
      const float a = v < 0 ? -v : v;
      mx[k] = a > mx[k] ? a : mx[k];
    }
  NormPart out;
  for (; i < n; ++i) {
    const float v = toFloat(x[i]);
    out.sumSq += static_cast<double>(v) * v;
    const float a = v < 0 ? -v : v;
    out.maxAbs = a > out.maxAbs ? a : out.maxAbs;
  }
  for (int k = 0; k < 8; ++k) {
    out.sumSq += acc[k];
    out.maxAbs = mx[k] > out.maxAbs ? mx[k] : out.maxAbs;
  }
  if (out.sumSq != out.sumSq) out.nan = true;  // a NaN element makes the sum NaN
  return out;
}

// float32 with explicit vectors: squares summed in double lanes, |x| max in float lanes.
inline NormPart normF32(const float* __restrict x, int64_t n) {
  NormPart out;
  int64_t i = 0;
#if defined(DTRAIN_OPT_AVX512)
  __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
  __m512 mx = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    a0 = _mm512_fmadd_pd(lo, lo, a0);
    a1 = _mm512_fmadd_pd(hi, hi, a1);
  }
  out.sumSq = _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
  out.maxAbs = _mm512_reduce_max_ps(mx);
#elif defined(DTRAIN_OPT_F16C)
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  __m256 mx = _mm256_setzero_ps();
  const __m256 absMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, _mm256_and_ps(v, absMask));
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    a0 = _mm256_fmadd_pd(lo, lo, a0);
    a1 = _mm256_fmadd_pd(hi, hi, a1);
  }
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(a0, a1));
  out.sumSq = (d[0] + d[1]) + (d[2] + d[3]);
  alignas(32) float m[8];
  _mm256_store_ps(m, mx);
  for (float v : m) out.maxAbs = v > out.maxAbs ? v : out.maxAbs;
#endif
  NormPart tail = normLoop(x + i, n - i);
  out.sumSq += tail.sumSq;
  out.maxAbs = tail.maxAbs > out.maxAbs ? tail.maxAbs : out.maxAbs;
  out.nan = out.sumSq != out.sumSq;
  return out;
}

NormPart norm(DType dt, const void* x, int64_t n) {
  if (dt == DType::kFloat32) return normF32(static_cast<const float*>(x), n);
  switch (dt) {
    case DType::kFloat16: return normLoop(static_cast<const F16*>(x), n);
    case DType::kBFloat16: return normLoop(static_cast<const BF16*>(x), n);
    default: return normLoop(static_cast<const float*>(x), n);
  }
}

// x = cast(x * s) in place (one load and one store per element: no pointer may alias it).
template <class T>
void scaleLoop(T* __restrict x, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) store(x[i], toFloat(x[i]) * s);
}

void scale(DType dt, void* x, int64_t n, float s) {
  switch (dt) {
    case DType::kFloat16: return scaleLoop(static_cast<F16*>(x), n, s);
    case DType::kBFloat16: return scaleLoop(static_cast<BF16*>(x), n, s);
    default: return scaleLoop(static_cast<float*>(x), n, s);
  }
}

CpuTable table(const char* name) {
  return CpuTable{name, &adam, &sgd, &finite, &convert, &norm, &scale, &geluFwd, &geluBwd, &lnFwd, &lnBwd};
}

// The kernel bodies, included once per ISA by reduce_kernels_{generic,avx2,avx512}.cc
// inside `namespace dtrain::DTRAIN_ISA_NS` and after a `#pragma GCC target`.
// Plain loops the compiler vectorises for the target, plus explicit hardware
// conversions where auto-vectorisation would not find them.
//
// Requires: DTRAIN_ISA_NS, and optionally DTRAIN_HAVE_F16C / DTRAIN_HAVE_AVX512.

namespace detail {

template <typename T>
struct Sum { static T f(T a, T b) { return a + b; } };
template <typename T>
struct Prod { static T f(T a, T b) { return a * b; } };
template <typename T>
struct Min { static T f(T a, T b) { return b < a ? b : a; } };
template <typename T>
struct Max { static T f(T a, T b) { return b > a ? b : a; } };

// NaN propagates through min/max as it does in torch (a NaN on any rank wins).
template <>
struct Min<float> { static float f(float a, float b) { return (b < a || b != b) ? b : a; } };
template <>
struct Max<float> { static float f(float a, float b) { return (b > a || b != b) ? b : a; } };
template <>
struct Min<double> { static double f(double a, double b) { return (b < a || b != b) ? b : a; } };
template <>
struct Max<double> { static double f(double a, double b) { return (b > a || b != b) ? b : a; } };

template <typename T, template <typename> class Op>
void loop(T* __restrict d, const T* __restrict s, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = Op<T>::f(d[i], s[i]);
}

template <typename T>
void reduceTyped(RedOp op, T* d, const T* s, size_t n) {
  switch (op) {
    case RedOp::kSum: case RedOp::kAvg: loop<T, Sum>(d, s, n); break;
    case RedOp::kProd: loop<T, Prod>(d, s, n); break;
    case RedOp::kMin: loop<T, Min>(d, s, n); break;
    case RedOp::kMax: loop<T, Max>(d, s, n); break;
  }
}

// ---- half <-> float conversion, vectorised where the target allows ----

inline void decodeHalf(float* __restrict d, const uint16_t* __restrict s, size_t n) {
  size_t i = 0;
#if defined(DTRAIN_HAVE_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i))));
#elif defined(DTRAIN_HAVE_F16C)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = halfToFloat(s[i]);
}

inline void encodeHalf(uint16_t* __restrict d, const float* __restrict s, size_t n) {
  size_t i = 0;
#if defined(DTRAIN_HAVE_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(DTRAIN_HAVE_F16C)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) d[i] = floatToHalf(s[i]);
}

// bfloat16 is the top half of a float32: integer shifts vectorise on any target.
inline void decodeBf16(float* __restrict d, const uint16_t* __restrict s, size_t n) {
  uint32_t* __restrict o = reinterpret_cast<uint32_t*>(d);
  for (size_t i = 0; i < n; ++i) o[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void encodeBf16(uint16_t* __restrict d, const float* __restrict s, size_t n) {
  const uint32_t* __restrict in = reinterpret_cast<const uint32_t*>(s);
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = in[i];
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = ((u & 0x7fffffffu) > 0x7f800000u) ? ((u >> 16) | 0x40u) : r;
    d[i] = static_cast<uint16_t>(nan);
  }
}

inline void decodeWire(DType w, float* d, const void* s, size_t n) {
  if (w == DType::kFloat16) decodeHalf(d, static_cast<const uint16_t*>(s), n);
  else decodeBf16(d, static_cast<const uint16_t*>(s), n);
}

inline void encodeWire(DType w, void* d, const float* s, size_t n) {
  if (w == DType::kFloat16) encodeHalf(static_cast<uint16_t*>(d), s, n);
  else encodeBf16(static_cast<uint16_t*>(d), s, n);
}

// Half-precision tensors reduce in float32 and round once per hop, in blocks
// small enough to stay in L1.
constexpr size_t kBlock = 512;

inline void reduceHalfTensor(DType dt, RedOp op, void* dst, const void* src, size_t n) {
  alignas(64) float a[kBlock];
  alignas(64) float b[kBlock];
  auto* d = static_cast<uint16_t*>(dst);
  auto* s = static_cast<const uint16_t*>(src);
  for (size_t i = 0; i < n; i += kBlock) {
    size_t m = n - i < kBlock ? n - i : kBlock;
    decodeWire(dt, a, d + i, m);
    decodeWire(dt, b, s + i, m);
    reduceTyped<float>(op, a, b, m);
    encodeWire(dt, d + i, a, m);
  }
}

}  // namespace detail

inline void reduce(DType dt, RedOp op, void* dst, const void* src, size_t n) {
  switch (dt) {
    case DType::kFloat32: detail::reduceTyped(op, static_cast<float*>(dst), static_cast<const float*>(src), n); break;
    case DType::kFloat64: detail::reduceTyped(op, static_cast<double*>(dst), static_cast<const double*>(src), n); break;
    case DType::kInt32: detail::reduceTyped(op, static_cast<int32_t*>(dst), static_cast<const int32_t*>(src), n); break;
    case DType::kInt64: detail::reduceTyped(op, static_cast<int64_t*>(dst), static_cast<const int64_t*>(src), n); break;
    case DType::kUInt8: detail::reduceTyped(op, static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n); break;
    case DType::kFloat16: case DType::kBFloat16: detail::reduceHalfTensor(dt, op, dst, src, n); break;
  }
}

inline void reduceWire(DType wire, RedOp op, float* dst, const void* src, size_t n) {
  alignas(64) float b[detail::kBlock];
  auto* s = static_cast<const uint16_t*>(src);
  for (size_t i = 0; i < n; i += detail::kBlock) {
    size_t m = n - i < detail::kBlock ? n - i : detail::kBlock;
    detail::decodeWire(wire, b, s + i, m);
    detail::reduceTyped<float>(op, dst + i, b, m);
  }
}

inline void encode(DType wire, void* dst, const float* src, size_t n) { detail::encodeWire(wire, dst, src, n); }
inline void decode(DType wire, float* dst, const void* src, size_t n) { detail::decodeWire(wire, dst, src, n); }

inline void scale(DType dt, void* x, size_t n, double s) {
  switch (dt) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(x);
      const float f = static_cast<float>(s);
      for (size_t i = 0; i < n; ++i) p[i] *= f;
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(x);
      for (size_t i = 0; i < n; ++i) p[i] *= s;
      break;
    }
    case DType::kFloat16: case DType::kBFloat16: {
      alignas(64) float a[detail::kBlock];
      auto* p = static_cast<uint16_t*>(x);
      const float f = static_cast<float>(s);
      for (size_t i = 0; i < n; i += detail::kBlock) {
        size_t m = n - i < detail::kBlock ? n - i : detail::kBlock;
        detail::decodeWire(dt, a, p + i, m);
        for (size_t j = 0; j < m; ++j) a[j] *= f;
        detail::encodeWire(dt, p + i, a, m);
      }
      break;
    }
    default: break;  // integer avg is rejected before it gets here
  }
}

inline KernelTable table(const char* name) {
  return KernelTable{name, &reduce, &reduceWire, &encode, &decode, &scale};
}

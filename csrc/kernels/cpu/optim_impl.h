// Chunk loops over [begin, end) of one tensor, included once per ISA by
// optim_{generic,avx2,avx512}.cc inside `namespace dtrain::kernels::isa_X` after a
// `#pragma GCC target`. float32 loops vectorise for the target; half-precision
// elements convert through float32 one by one.

struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};
inline float toFloat(float x) { return x; }
inline float toFloat(F16 x) { return halfToFloat(x.bits); }
inline float toFloat(BF16 x) { return bf16ToFloat(x.bits); }
inline void store(float& d, float x) { d = x; }
inline void store(F16& d, float x) { d.bits = floatToHalf(x); }
inline void store(BF16& d, float x) { d.bits = floatToBf16(x); }

template <class T, Decay kDecay, bool kAms>
void adamLoop(void* const* s, int64_t b, int64_t e, const AdamArgs& a) {
  T* __restrict p = static_cast<T*>(s[kParam]);
  const T* __restrict g = static_cast<const T*>(s[kGrad]);
  T* __restrict m = static_cast<T*>(s[kExpAvg]);
  T* __restrict v = static_cast<T*>(s[kExpAvgSq]);
  T* __restrict vm = static_cast<T*>(s[kMaxExpAvgSq]);
  for (int64_t i = b; i < e; ++i) {
    float pf = toFloat(p[i]), mf = toFloat(m[i]), vf = toFloat(v[i]), vmf = kAms ? toFloat(vm[i]) : 0.f;
    adamMath<kDecay, kAms>(pf, toFloat(g[i]), mf, vf, vmf, a);
    store(p[i], pf);
    store(m[i], mf);
    store(v[i], vf);
    if (kAms) store(vm[i], vmf);
  }
}

template <class T, bool kL2, Momentum kMom, bool kNesterov>
void sgdLoop(void* const* s, int64_t b, int64_t e, const SgdArgs& a) {
  T* __restrict p = static_cast<T*>(s[kParam]);
  const T* __restrict g = static_cast<const T*>(s[kGrad]);
  T* __restrict buf = static_cast<T*>(s[kMomentumBuf]);
  for (int64_t i = b; i < e; ++i) {
    float pf = toFloat(p[i]), bf = kMom == Momentum::kLater ? toFloat(buf[i]) : 0.f;
    sgdMath<kL2, kMom, kNesterov>(pf, toFloat(g[i]), bf, a);
    store(p[i], pf);
    if (kMom != Momentum::kNone) store(buf[i], bf);
  }
}

// Dispatch: runtime flags to template arguments.
template <class T>
void adamTyped(Decay d, bool ams, void* const* s, int64_t b, int64_t e, const AdamArgs& a) {
  switch (d) {
    case Decay::kNone: return ams ? adamLoop<T, Decay::kNone, true>(s, b, e, a) : adamLoop<T, Decay::kNone, false>(s, b, e, a);
    case Decay::kL2: return ams ? adamLoop<T, Decay::kL2, true>(s, b, e, a) : adamLoop<T, Decay::kL2, false>(s, b, e, a);
    case Decay::kDecoupled:
      return ams ? adamLoop<T, Decay::kDecoupled, true>(s, b, e, a) : adamLoop<T, Decay::kDecoupled, false>(s, b, e, a);
  }
}

void adam(DType dt, Decay d, bool ams, void* const* s, int64_t b, int64_t e, const AdamArgs& a) {
  switch (dt) {
    case DType::kFloat16: return adamTyped<F16>(d, ams, s, b, e, a);
    case DType::kBFloat16: return adamTyped<BF16>(d, ams, s, b, e, a);
    default: return adamTyped<float>(d, ams, s, b, e, a);
  }
}

template <class T, bool kL2, Momentum kMom>
void sgdNesterov(bool nesterov, void* const* s, int64_t b, int64_t e, const SgdArgs& a) {
  return nesterov ? sgdLoop<T, kL2, kMom, true>(s, b, e, a) : sgdLoop<T, kL2, kMom, false>(s, b, e, a);
}

template <class T, bool kL2>
void sgdMomentum(Momentum mom, bool nesterov, void* const* s, int64_t b, int64_t e, const SgdArgs& a) {
  switch (mom) {
    case Momentum::kNone: return sgdLoop<T, kL2, Momentum::kNone, false>(s, b, e, a);
    case Momentum::kFirst: return sgdNesterov<T, kL2, Momentum::kFirst>(nesterov, s, b, e, a);
    case Momentum::kLater: return sgdNesterov<T, kL2, Momentum::kLater>(nesterov, s, b, e, a);
  }
}

template <class T>
void sgdTyped(bool l2, Momentum mom, bool nesterov, void* const* s, int64_t b, int64_t e, const SgdArgs& a) {
  return l2 ? sgdMomentum<T, true>(mom, nesterov, s, b, e, a) : sgdMomentum<T, false>(mom, nesterov, s, b, e, a);
}

void sgd(DType dt, bool l2, Momentum mom, bool nesterov, void* const* s, int64_t b, int64_t e, const SgdArgs& a) {
  switch (dt) {
    case DType::kFloat16: return sgdTyped<F16>(l2, mom, nesterov, s, b, e, a);
    case DType::kBFloat16: return sgdTyped<BF16>(l2, mom, nesterov, s, b, e, a);
    default: return sgdTyped<float>(l2, mom, nesterov, s, b, e, a);
  }
}

// An element is inf or NaN when its exponent bits are all ones: integer tests the
// compiler vectorises (a float compare chain would not be, NaN being unordered).
template <class U, int kShift, uint32_t kMask>
bool finiteBits(const void* grad, int64_t b, int64_t e) {
  const U* __restrict g = static_cast<const U*>(grad);
  uint32_t bad = 0;
  for (int64_t i = b; i < e; ++i) bad |= ((static_cast<uint32_t>(g[i]) >> kShift) & kMask) == kMask;
  return bad == 0;
}

bool finite(DType dt, const void* grad, int64_t b, int64_t e) {
  switch (dt) {
    case DType::kFloat16: return finiteBits<uint16_t, 10, 0x1f>(grad, b, e);
    case DType::kBFloat16: return finiteBits<uint16_t, 7, 0xff>(grad, b, e);
    default: return finiteBits<uint32_t, 23, 0xff>(grad, b, e);
  }
}



#include "kernels/cpu/optim.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/error.h"
#include "kernels/cpu/threads.h"

namespace dtrain {
namespace kernels {

CpuTable optimTable_generic();
CpuTable optimTable_avx2();
CpuTable optimTable_avx512();

namespace {

// Elements per chunk: large enough to amortise a thread's start, a multiple of 64 so
// every chunk but a tensor's last starts on a vector boundary.
constexpr int64_t kChunk = int64_t(1) << 16;

const CpuTable& table() {
  static const CpuTable t = [] {
    const char* want = std::getenv("DTRAIN_ISA");  // generic|avx2|avx512 pins one (tests, benchmarks)
    auto has512 = [] {
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    };
    auto has2 = [] { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                            __builtin_cpu_supports("fma"); };
    if (want && !std::strcmp(want, "generic")) return optimTable_generic();
    if (want && !std::strcmp(want, "avx2") && has2()) return optimTable_avx2();
    if (has512() && !(want && !std::strcmp(want, "avx2"))) return optimTable_avx512();
    if (has2()) return optimTable_avx2();
    return optimTable_generic();
  }();
  return t;
}

struct Piece {
  int32_t tensor;
  int64_t begin, end;
};

std::vector<Piece> pieces(const TensorLists& t) {
  std::vector<Piece> out;
  for (size_t i = 0; i < t.numel.size(); ++i)
    for (int64_t b = 0; b < t.numel[i]; b += kChunk)
      out.push_back(Piece{static_cast<int32_t>(i), b, std::min(t.numel[i], b + kChunk)});
  return out;
}

// f(piece) over all pieces on up to `threads` threads (this one included). Returns
// false as soon as some f returned false (the others stop taking pieces).
template <class F>
bool parallel(const std::vector<Piece>& ps, int threads, F f) {
  const int n = static_cast<int>(std::min<size_t>(std::max(threads, 1), ps.size()));
  if (n <= 1) {
    for (const Piece& p : ps)
      if (!f(p)) return false;
    return true;
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> ok{true};
  onThreads(n, [&](int, int) {
    for (size_t i; ok.load(std::memory_order_relaxed) && (i = next.fetch_add(1)) < ps.size();)
      if (!f(ps[i])) ok = false;
  });
  return ok;
}

void check(const TensorLists& t, int slots) {
  DTRAIN_CHECK(t.ptr.size() == t.numel.size(), kConfig, "got ", t.ptr.size(), " tensors' pointers for ",
               t.numel.size(), " sizes");
  DTRAIN_CHECK(t.dtype == DType::kFloat32 || t.dtype == DType::kFloat16 || t.dtype == DType::kBFloat16, kConfig,
               "fused optimizers take float32, float16 or bfloat16 tensors, not ", dtypeName(t.dtype));
  for (size_t i = 0; i < t.ptr.size(); ++i) {
    DTRAIN_CHECK(t.numel[i] >= 0, kConfig, "tensor ", i, " has a negative size ", t.numel[i]);
    for (int s = 0; s < slots; ++s)
      DTRAIN_CHECK(t.numel[i] == 0 || t.ptr[i][s] != nullptr, kConfig, "tensor ", i, " has no memory in slot ", s);
  }
}

bool allFinite(const TensorLists& t, const std::vector<Piece>& ps, int threads) {
  const CpuTable& k = table();
  return parallel(ps, threads, [&](const Piece& p) { return k.finite(t.dtype, t.ptr[p.tensor][kGrad], p.begin, p.end); });
}

}  // namespace

const char* optimIsa() { return table().name; }

const CpuTable& cpuTable() { return table(); }

bool adamStep(const TensorLists& t, Decay decay, bool amsgrad, const AdamArgs& a, bool checkFinite, int threads) {
  check(t, amsgrad ? 5 : 4);
  const std::vector<Piece> ps = pieces(t);
  if (checkFinite && !allFinite(t, ps, threads)) return true;
  const CpuTable& k = table();
  parallel(ps, threads, [&](const Piece& p) {
    k.adam(t.dtype, decay, amsgrad, t.ptr[p.tensor].data(), p.begin, p.end, a);
    return true;
  });
  return false;
}

bool sgdStep(const TensorLists& t, bool l2, Momentum momentum, bool nesterov, const SgdArgs& a, bool checkFinite,
             int threads) {
  check(t, momentum == Momentum::kNone ? 2 : 3);
  const std::vector<Piece> ps = pieces(t);
  if (checkFinite && !allFinite(t, ps, threads)) return true;
  const CpuTable& k = table();
  parallel(ps, threads, [&](const Piece& p) {
    k.sgd(t.dtype, l2, momentum, nesterov, t.ptr[p.tensor].data(), p.begin, p.end, a);
    return true;
  });
  return false;
}

namespace {

// Pieces of the flat buffer: tensor i's chunk [b, e) sits at flat offset off_i + b.
std::vector<int64_t> offsets(const std::vector<int64_t>& numel) {
  std::vector<int64_t> off(numel.size() + 1, 0);
  for (size_t i = 0; i < numel.size(); ++i) off[i + 1] = off[i] + numel[i];
  return off;
}

std::vector<Piece> piecesOf(const std::vector<int64_t>& numel) {
  TensorLists t;
  t.numel = numel;
  return pieces(t);
}

size_t bytesOf(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

void checkFloat(DType dt, const char* what) {
  DTRAIN_CHECK(dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16, kConfig, what,
               " must be float32, float16 or bfloat16, not ", dtypeName(dt));
}

}  // namespace

void packTensors(const std::vector<const void*>& src, const std::vector<int64_t>& numel, DType srcType, void* flat,
                 DType flatType, float scale, int threads) {
  checkFloat(srcType, "packed tensors");
  checkFloat(flatType, "the flat buffer");
  DTRAIN_CHECK(src.size() == numel.size(), kConfig, src.size(), " tensors but ", numel.size(), " sizes");
  const std::vector<int64_t> off = offsets(numel);
  const CpuTable& k = table();
  auto* out = static_cast<uint8_t*>(flat);
  const bool stream = off.back() * int64_t(bytesOf(flatType)) >= kStreamBytes;
  parallel(piecesOf(numel), threads, [&](const Piece& p) {
    const auto* in = static_cast<const uint8_t*>(src[p.tensor]) + p.begin * bytesOf(srcType);
    k.convert(flatType, out + (off[p.tensor] + p.begin) * bytesOf(flatType), srcType, in, p.end - p.begin, scale,
              false, stream);
    return true;
  });
}

void unpackTensors(const void* flat, DType flatType, const std::vector<void*>& dst, const std::vector<int64_t>& numel,
                   DType dstType, float scale, bool accumulate, int threads) {
  checkFloat(dstType, "unpacked tensors");
  checkFloat(flatType, "the flat buffer");
  DTRAIN_CHECK(dst.size() == numel.size(), kConfig, dst.size(), " tensors but ", numel.size(), " sizes");
  const std::vector<int64_t> off = offsets(numel);
  const CpuTable& k = table();
  const auto* in = static_cast<const uint8_t*>(flat);
  parallel(piecesOf(numel), threads, [&](const Piece& p) {
    auto* out = static_cast<uint8_t*>(dst[p.tensor]) + p.begin * bytesOf(dstType);
    k.convert(dstType, out, flatType, in + (off[p.tensor] + p.begin) * bytesOf(flatType), p.end - p.begin, scale,
              accumulate, false);
    return true;
  });
}

void scaleTensors(const std::vector<void*>& x, const std::vector<int64_t>& numel, DType dt, float s, int threads) {
  checkFloat(dt, "scaled tensors");
  DTRAIN_CHECK(x.size() == numel.size(), kConfig, x.size(), " tensors but ", numel.size(), " sizes");
  const CpuTable& k = table();
  parallel(piecesOf(numel), threads, [&](const Piece& p) {
    k.scale(dt, static_cast<uint8_t*>(x[p.tensor]) + p.begin * bytesOf(dt), p.end - p.begin, s);
    return true;
  });
}

NormPart multiTensorNorm(const std::vector<const void*>& x, const std::vector<int64_t>& numel, DType dt, int threads) {
  checkFloat(dt, "tensors of a norm");
  DTRAIN_CHECK(x.size() == numel.size(), kConfig, x.size(), " tensors but ", numel.size(), " sizes");
  const std::vector<Piece> ps = piecesOf(numel);
  std::vector<NormPart> parts(ps.size());
  const CpuTable& k = table();
  parallel(ps, threads, [&](const Piece& p) {
    const size_t i = &p - ps.data();
    parts[i] = k.norm(dt, static_cast<const uint8_t*>(x[p.tensor]) + p.begin * bytesOf(dt), p.end - p.begin);
    return true;
  });
  NormPart out;  // summed in piece order: the same result for any thread count
  for (const NormPart& q : parts) {
    out.sumSq += q.sumSq;
    out.maxAbs = q.maxAbs > out.maxAbs ? q.maxAbs : out.maxAbs;
    out.nan = out.nan || q.nan;
  }
  return out;
}

}  // namespace kernels
}  // namespace dtrain

#include "kernels/cpu/nn.h"

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "common/error.h"
#include "kernels/cpu/optim.h"
#include "kernels/cpu/threads.h"

namespace dtrain {
namespace kernels {

namespace {

void checkArgs(DType dt, int64_t rows, int64_t n) {
  DTRAIN_CHECK(dt == DType::kFloat32 || dt == DType::kFloat64, kConfig,
               "fused GELU/LayerNorm kernels take float32 or float64, not ", dtypeName(dt));
  DTRAIN_CHECK(rows >= 0 && n >= 0, kConfig, "negative shape: ", rows, " rows of ", n);
}

// f(thread, r0, r1) over contiguous row ranges, one per thread (thread 0 is this one;
// threads: at most `threads`, fewer where the team comes out smaller).
template <class F>
void byRows(int64_t rows, int64_t n, int threads, F f) {
  // Not worth a thread below ~64K elements.
  const int64_t want = std::max<int64_t>(1, rows * std::max<int64_t>(n, 1) / (int64_t(1) << 16));
  const int t = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(std::max(threads, 1)), want, std::max<int64_t>(rows, 1)}));
  onThreads(t, [&](int k, int team) { f(k, rows * k / team, rows * (k + 1) / team); });
}

size_t elem(DType dt) { return dt == DType::kFloat64 ? 8 : 4; }

// Scratch rows of `bytes` for `slots` threads, each starting on a cache line: the kernels
// load and store them a whole vector at a time for every row, and a vector straddling two
// lines costs two accesses. (A std::vector per thread came from malloc, 16-byte aligned: on
// the worker's arena the LayerNorm backward's column sums straddled lines and its half of
// the dx pass took twice the main thread's. [4096, 1024] float32 backward on 2 threads,
// A/B of the two builds, 3 rounds: 1.56-1.72 -> 1.03-1.34 ms.)
class ScratchRows {
 public:
  ScratchRows(int slots, size_t bytes)
      : stride_((bytes + 63) / 64 * 64),
        buf_(size_t(slots) * stride_ + 64),
        base_(buf_.data() + (64 - reinterpret_cast<uintptr_t>(buf_.data()) % 64) % 64) {}
  uint8_t* row(int slot) { return base_ + size_t(slot) * stride_; }

 private:
  size_t stride_;
  std::vector<uint8_t> buf_;
  uint8_t* base_;  // buf_'s first cache-line boundary
};

// Outputs of kStreamBytes or more skip the caches (nn_impl.h's storeTile).
bool streamOutput(DType dt, int64_t rows, int64_t n) {
  const char* env = std::getenv("DTRAIN_NN_STREAM");  // 0: never, 1: always (tests)
  if (env && (env[0] == '0' || env[0] == '1')) return env[0] == '1';
  return rows * n * int64_t(elem(dt)) >= kStreamBytes;
}

// Sums per-thread column sums (in thread order) and stores them in the output type.
void reduceColumns(DType dt, const std::vector<std::vector<double>>& parts, int64_t n, void* out) {
  for (int64_t c = 0; c < n; ++c) {
    double s = 0;
    for (const auto& p : parts)
      if (!p.empty()) s += p[c];
    if (dt == DType::kFloat64)
      static_cast<double*>(out)[c] = s;
    else
      static_cast<float*>(out)[c] = static_cast<float>(s);
  }
}

}  // namespace

void geluForward(DType dt, const void* x, const void* bias, void* y, int64_t rows, int64_t n, int threads) {
  checkArgs(dt, rows, n);
  const CpuTable& k = cpuTable();
  const bool stream = streamOutput(dt, rows, n);
  byRows(rows, n, threads, [&](int, int64_t r0, int64_t r1) { k.geluFwd(dt, x, bias, y, r0, r1, n, stream); });
}

void geluBackward(DType dt, const void* dy, const void* x, const void* bias, void* dx, void* dbias, int64_t rows,
                  int64_t n, int threads) {
  checkArgs(dt, rows, n);
  const CpuTable& k = cpuTable();
  const bool stream = streamOutput(dt, rows, n);
  std::vector<std::vector<double>> parts(std::max(threads, 1));
  ScratchRows scratch(std::max(threads, 1), n * elem(dt));
  byRows(rows, n, threads, [&](int t, int64_t r0, int64_t r1) {
    parts[t].assign(n, 0.0);
    constexpr int64_t kBlock = 64;  // rows summed in the element type before joining the doubles
    for (int64_t r = r0; r < r1; r += kBlock)
      k.geluBwd(dt, dy, x, bias, dx, parts[t].data(), r, std::min(r1, r + kBlock), n, scratch.row(t), stream);
  });
  reduceColumns(dt, parts, n, dbias);
}

void layerNormForward(DType dt, const void* x, const void* weight, const void* bias, void* y, void* mean, void* rstd,
                      int64_t rows, int64_t n, double eps, int threads) {
  checkArgs(dt, rows, n);
  DTRAIN_CHECK(n > 0 || rows == 0, kConfig, "LayerNorm over 0 elements per row is undefined");
  const CpuTable& k = cpuTable();
  const bool stream = streamOutput(dt, rows, n);
  byRows(rows, n, threads, [&](int, int64_t r0, int64_t r1) {
    k.lnFwd(dt, x, weight, bias, y, mean, rstd, r0, r1, n, eps, stream);
  });
}

void layerNormBackward(DType dt, const void* dy, const void* x, const void* weight, const void* mean,
                       const void* rstd, void* dx, void* dweight, void* dbias, int64_t rows, int64_t n, int threads) {
  checkArgs(dt, rows, n);
  const CpuTable& k = cpuTable();
  const int slots = std::max(threads, 1);
  const bool stream = streamOutput(dt, rows, n);
  std::vector<std::vector<double>> pw(slots), pb(slots);
  ScratchRows scratch(slots, 2 * n * elem(dt));  // two rows per thread: column sums of dy * xhat and of dy
  byRows(rows, n, threads, [&](int t, int64_t r0, int64_t r1) {
    pw[t].assign(n, 0.0);
    pb[t].assign(n, 0.0);
    constexpr int64_t kBlock = 64;
    for (int64_t r = r0; r < r1; r += kBlock)
      k.lnBwd(dt, dy, x, weight, mean, rstd, dx, pw[t].data(), pb[t].data(), r, std::min(r1, r + kBlock), n,
              scratch.row(t), stream);
  });
  if (dweight) reduceColumns(dt, pw, n, dweight);
  if (dbias) reduceColumns(dt, pb, n, dbias);
}

}  // namespace kernels
}  // namespace dtrain

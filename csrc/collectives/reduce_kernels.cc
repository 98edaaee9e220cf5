#include "collectives/reduce_kernels.h"

#include <cstdlib>
#include <cstring>
#include <vector>

namespace dtrain {

KernelTable kernelTable_generic();
KernelTable kernelTable_avx2();
KernelTable kernelTable_avx512();

namespace {

bool cpuHas(const char* name) {
  __builtin_cpu_init();
  if (!std::strcmp(name, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (!std::strcmp(name, "avx2"))
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("fma");
  return !std::strcmp(name, "generic");
}

KernelTable byName(const char* name) {
  if (!std::strcmp(name, "avx512")) return kernelTable_avx512();
  if (!std::strcmp(name, "avx2")) return kernelTable_avx2();
  return kernelTable_generic();
}

KernelTable& current() {
  // DTRAIN_ISA=generic|avx2|avx512 pins a table (for tests and benchmarks).
  static KernelTable table = [] {
    const char* want = std::getenv("DTRAIN_ISA");
    if (want && cpuHas(want)) return byName(want);
    for (const char* name : {"avx512", "avx2"})
      if (cpuHas(name)) return byName(name);
    return kernelTable_generic();
  }();
  return table;
}

}  // namespace

const KernelTable& kernels() { return current(); }

bool setKernelIsa(const char* name) {
  if (!cpuHas(name)) return false;
  current() = byName(name);
  return true;
}

void roundTripWire(DType wire, float* x, size_t n) {
  // In place through a small stack buffer: encode then decode.
  alignas(64) uint16_t tmp[1024];
  const KernelTable& k = kernels();
  for (size_t i = 0; i < n; i += 1024) {
    size_t m = n - i < 1024 ? n - i : 1024;
    k.encode(wire, tmp, x + i, m);
    k.decode(wire, x + i, tmp, m);
  }
}

}  // namespace dtrain

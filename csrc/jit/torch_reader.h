// The C interface between dtrain._C and the tensor reader that dtrain compiles at run time
// against the installed torch (csrc/jit/torch_reader.cc, built by dtrain.ops._torch_reader).
// dtrain._C itself never includes a torch header, so one build serves every torch version;
// this header is all the two sides share, and it includes nothing of torch's.
#pragma once

#include <Python.h>

#include <cstdint>

#include "common/dtype.h"

namespace dtrain {

// Bumped whenever TorchTensorInfo or TorchReadFn change: _C refuses a reader of another.
constexpr int kTorchReaderAbi = 1;

struct TorchTensorInfo {
  void* ptr;       // the first element (mutable_data(): a copy-on-write storage is materialised)
  int64_t numel;
  int32_t dtype;   // a DType (common/dtype.h): kFloat32, kFloat16 or kBFloat16
};

// Reads items[0..n) (each an exact torch.Tensor or torch.nn.Parameter: the caller checked
// the type) into out[0..n) and returns n, or returns the index of the first item that is
// not a defined, strided, contiguous CPU tensor of float32/float16/bfloat16 with storage
// and no negation or conjugation bit (the kernels would read the wrong values through its
// pointer). Never throws, never sets a Python error; needs the GIL.
using TorchReadFn = int64_t (*)(PyObject* const* items, int64_t n, TorchTensorInfo* out);

}  // namespace dtrain

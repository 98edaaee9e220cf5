// Reads a Python list of torch tensors (data pointer, size, dtype) in one C++ loop, for
// the fused kernels' Python front (pack, unpack, norms, clipping).
//
// Two ways, the same answers:
// - Through torch's own C++ objects, once dtrain.ops._torch_reader has compiled
//   csrc/jit/torch_reader.cc against the installed torch and handed its function over
//   (useTorchReader): a few ns a tensor.
// - Until then, or where that cannot be built: the extension does not link libtorch, so it
//   calls the same C functions Python's `t.data_ptr()`, `t.is_contiguous()`, `t.is_neg()`,
//   `t.nbytes`, `t.dtype` and `t.is_cpu` reach, through the descriptors torch.Tensor's type
//   holds for them (the size comes from the `nbytes` getter: `numel()` is a method with an
//   argument parser), and calls the C function behind each descriptor itself. That skips
//   the interpreter, the attribute lookup and the descriptor's call machinery of each
//   access: ~40 us for 200 tensors against ~90 us from a Python loop.
// Only exact torch.Tensor and torch.nn.Parameter objects take either path (a subclass may
// override any of those reads); anything else, or any tensor the kernels cannot read in
// place (not CPU, not contiguous, a negated view, not float32/fp16/bf16), makes read()
// return nothing and the caller falls back to its Python checks, which copy such a tensor
// or raise the error that names the problem.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/dtype.h"
#include "jit/torch_reader.h"

namespace dtrain {

// Consecutive tensors of one dtype (one kernel call each).
struct TensorRun {
  DType dtype;
  std::vector<void*> ptr;
  std::vector<int64_t> numel;
  int64_t total = 0;
};

struct TensorList {
  std::vector<TensorRun> runs;
  int64_t total = 0;   // elements over all runs
  size_t count = 0;    // tensors
};

class TensorReader {
 public:
  // Takes the descriptors from `tensorType` (torch.Tensor); `parameterType` is the other
  // exact type accepted; `dtypes` maps torch dtypes to DType. Returns false (and reads
  // nothing later) when one of the five is not the kind of descriptor expected.
  bool bind(pybind11::handle tensorType, pybind11::handle parameterType, pybind11::dict dtypes);
  bool bound() const { return bound_; }

  // The tensors of `seq` (a list or tuple) in runs of one dtype, or nothing when one of
  // them needs the caller's careful path. Needs the GIL.
  std::optional<TensorList> read(pybind11::handle seq) const;

  // Reads through `read` (a TorchReadFn, as an address; 0: the descriptors again) from now
  // on; false, and nothing changes, when bind() has not succeeded or the reader was built
  // for another `abi`.
  bool useTorchReader(uintptr_t read, int abi);
  bool usingTorchReader() const { return torchRead_ != nullptr; }

 private:
  std::optional<TensorList> readWithTorch(PyObject* items, Py_ssize_t n) const;

  bool bound_ = false;
  PyObject* tensorType_ = nullptr;
  PyObject* parameterType_ = nullptr;
  PyObject* dataPtr_ = nullptr;      // method descriptors: called with the tensor as self
  PyObject* contiguous_ = nullptr;
  PyObject* nbytes_ = nullptr;       // getset descriptors
  PyObject* dtype_ = nullptr;
  PyObject* isCpu_ = nullptr;
  PyObject* isNeg_ = nullptr;        // a method descriptor
  TorchReadFn torchRead_ = nullptr;
  std::vector<std::pair<PyObject*, DType>> dtypes_;  // torch dtype objects are singletons
};

}  // namespace dtrain

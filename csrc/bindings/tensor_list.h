// Reads a Python list of torch tensors (data pointer, size, dtype) in one C++ loop, for
// the tensor-fusion kernels' Python front.
//
// The extension does not link libtorch, so it cannot look inside a tensor; it calls the
// same C functions Python's `t.data_ptr()`, `t.is_contiguous()`, `t.nbytes`, `t.dtype`
// and `t.is_cpu` reach, through the descriptors torch.Tensor's type holds for them (the
// size comes from the `nbytes` getter: `numel()` is a method with an argument parser), and
// calls the C function behind each descriptor itself. That skips the interpreter, the
// attribute lookup and the descriptor's call machinery of each access: for 200 tensors,
// 37 us (42 through the descriptors, 48 with numel()) against 77 us from a Python loop
// (the difference decides a 1M-parameter pack, whose kernel takes 80 us). Only exact torch.Tensor and torch.nn.Parameter objects take this
// path (a subclass may override any of the five); anything else, or any tensor the
// kernels cannot read in place (not CPU, not contiguous, not float32/fp16/bf16), makes
// read() return nothing and the caller falls back to its Python checks, which copy a
// non-contiguous tensor or raise the error that names the problem.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/dtype.h"

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

 private:
  bool bound_ = false;
  PyObject* tensorType_ = nullptr;
  PyObject* parameterType_ = nullptr;
  PyObject* dataPtr_ = nullptr;      // method descriptors: called with the tensor as self
  PyObject* contiguous_ = nullptr;
  PyObject* nbytes_ = nullptr;       // getset descriptors
  PyObject* dtype_ = nullptr;
  PyObject* isCpu_ = nullptr;
  std::vector<std::pair<PyObject*, DType>> dtypes_;  // torch dtype objects are singletons
};

}  // namespace dtrain

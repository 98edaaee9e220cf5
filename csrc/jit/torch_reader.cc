// Reads tensors' pointers, sizes and dtypes straight from their at::Tensor (see
// torch_reader.h for the contract). Not part of the dtrain._C build: dtrain.ops._torch_reader
// compiles this one file against the torch that is installed, on first use, and caches the
// library per torch version. Through torch's Python API the same reads cost ~190 ns a tensor
// (five attribute calls, each checking for __torch_function__ overrides); here, a few ns.
#include <torch/csrc/autograd/python_variable.h>

#include "jit/torch_reader.h"

namespace {

int32_t dtypeOf(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return static_cast<int32_t>(dtrain::DType::kFloat32);
    case c10::ScalarType::Half: return static_cast<int32_t>(dtrain::DType::kFloat16);
    case c10::ScalarType::BFloat16: return static_cast<int32_t>(dtrain::DType::kBFloat16);
    default: return -1;
  }
}

// True when `t` is readable in place; fills `info`. May throw (c10::Error from an accessor
// of an unusual TensorImpl): the caller catches.
bool readOne(const at::Tensor& t, dtrain::TorchTensorInfo& info) {
  if (!t.defined()) return false;
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->device_type() != c10::DeviceType::CPU || impl->layout() != c10::kStrided) return false;
  if (impl->is_neg() || impl->is_conj() || !impl->has_storage()) return false;
  if (!impl->is_contiguous()) return false;
  const int32_t dt = dtypeOf(impl->dtype().toScalarType());
  if (dt < 0) return false;
  info.ptr = impl->mutable_data();
  info.numel = impl->numel();
  info.dtype = dt;
  return true;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int dtrain_torch_reader_abi() { return dtrain::kTorchReaderAbi; }

__attribute__((visibility("default"))) int64_t dtrain_torch_read(PyObject* const* items, int64_t n,
                                                                 dtrain::TorchTensorInfo* out) {
  int64_t i = 0;
  try {
    for (; i < n; ++i)
      if (!readOne(THPVariable_Unpack(items[i]), out[i])) return i;
  } catch (...) {
    return i;
  }
  return n;
}

}  // extern "C"

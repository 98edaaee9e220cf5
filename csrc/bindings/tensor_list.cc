#include "bindings/tensor_list.h"

namespace py = pybind11;

namespace dtrain {

namespace {

// A new reference, or nullptr with the Python error cleared (the caller falls back).
// The C function behind a method descriptor is called directly when its calling
// convention is one of the two below (skipping the descriptor's own call machinery),
// else through the descriptor.
PyObject* callMethod(PyObject* descr, PyObject* self) {
  const PyMethodDef* m = reinterpret_cast<PyMethodDescrObject*>(descr)->d_method;
  PyObject* r;
  switch (m->ml_flags) {
    case METH_NOARGS:
      r = m->ml_meth(self, nullptr);
      break;
    case METH_VARARGS | METH_KEYWORDS: {
      static PyObject* const empty = PyTuple_New(0);  // immortal enough: held for the process
      r = reinterpret_cast<PyCFunctionWithKeywords>(reinterpret_cast<void (*)()>(m->ml_meth))(self, empty, nullptr);
      break;
    }
    default:
      r = PyObject_Vectorcall(descr, &self, 1, nullptr);
  }
  if (!r) PyErr_Clear();
  return r;
}

// The getter behind a getset descriptor, called directly.
PyObject* getAttr(PyObject* descr, PyObject* self) {
  const PyGetSetDef* g = reinterpret_cast<PyGetSetDescrObject*>(descr)->d_getset;
  PyObject* r = g->get ? g->get(self, g->closure)
                       : Py_TYPE(descr)->tp_descr_get(descr, self, reinterpret_cast<PyObject*>(Py_TYPE(self)));
  if (!r) PyErr_Clear();
  return r;
}

// The attribute `name` of `type` when it is a descriptor of `kind`, as a new reference.
PyObject* descriptor(py::handle type, const char* name, PyTypeObject* kind) {
  PyObject* d = PyObject_GetAttrString(type.ptr(), name);
  if (!d) {
    PyErr_Clear();
    return nullptr;
  }
  if (!PyObject_TypeCheck(d, kind) || !Py_TYPE(d)->tp_descr_get) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

}  // namespace

bool TensorReader::bind(py::handle tensorType, py::handle parameterType, py::dict dtypes) {
  if (bound_) return true;
  PyObject* d[6] = {descriptor(tensorType, "data_ptr", &PyMethodDescr_Type),
                    descriptor(tensorType, "nbytes", &PyGetSetDescr_Type),
                    descriptor(tensorType, "is_contiguous", &PyMethodDescr_Type),
                    descriptor(tensorType, "dtype", &PyGetSetDescr_Type),
                    descriptor(tensorType, "is_cpu", &PyGetSetDescr_Type),
                    descriptor(tensorType, "is_neg", &PyMethodDescr_Type)};
  bool ok = PyType_Check(tensorType.ptr()) && PyType_Check(parameterType.ptr());
  for (PyObject* x : d) ok = ok && x;
  if (!ok) {
    for (PyObject* x : d) Py_XDECREF(x);
    return false;
  }
  // Held for the life of the process, as the module's own objects are.
  dataPtr_ = d[0], nbytes_ = d[1], contiguous_ = d[2], dtype_ = d[3], isCpu_ = d[4], isNeg_ = d[5];
  tensorType_ = tensorType.inc_ref().ptr();
  parameterType_ = parameterType.inc_ref().ptr();
  for (auto item : dtypes) dtypes_.emplace_back(item.first.inc_ref().ptr(), item.second.cast<DType>());
  bound_ = true;
  return true;
}

std::optional<TensorList> TensorReader::read(py::handle seq) const {
  if (!bound_ || !(PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr()))) return std::nullopt;
  // A tuple of the items: a torch function mode active in this thread would run Python
  // code inside the calls below, which could change a list while we walk it.
  // (The torch reader runs no Python code, but the tuple also gives it one array of items.)
  auto items = py::reinterpret_steal<py::object>(PySequence_Tuple(seq.ptr()));
  if (!items) {
    PyErr_Clear();
    return std::nullopt;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(items.ptr());
  if (torchRead_) return readWithTorch(items.ptr(), n);
  TensorList out;
  out.count = size_t(n);
  PyObject* runDtype = nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* t = PyTuple_GET_ITEM(items.ptr(), i);
    PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(t));
    if (type != tensorType_ && type != parameterType_) return std::nullopt;
    auto cpu = py::reinterpret_steal<py::object>(getAttr(isCpu_, t));
    if (cpu.ptr() != Py_True) return std::nullopt;
    auto dt = py::reinterpret_steal<py::object>(getAttr(dtype_, t));
    if (!dt) return std::nullopt;
    if (dt.ptr() != runDtype) {
      const DType* found = nullptr;
      for (const auto& [obj, d] : dtypes_)
        if (obj == dt.ptr()) found = &d;
      if (!found) return std::nullopt;
      runDtype = dt.ptr();  // kept alive by dtypes_
      out.runs.push_back(TensorRun{*found, {}, {}, 0});
    }
    auto contiguous = py::reinterpret_steal<py::object>(callMethod(contiguous_, t));
    if (contiguous.ptr() != Py_True) return std::nullopt;
    // A negated view (torch._neg_view, a complex tensor's .conj().imag) shares its base's
    // memory: read through the pointer it would give the values' negation.
    auto neg = py::reinterpret_steal<py::object>(callMethod(isNeg_, t));
    if (neg.ptr() != Py_False) return std::nullopt;
    auto ptr = py::reinterpret_steal<py::object>(callMethod(dataPtr_, t));
    auto nbytes = py::reinterpret_steal<py::object>(getAttr(nbytes_, t));
    if (!ptr || !nbytes || !PyLong_Check(ptr.ptr()) || !PyLong_Check(nbytes.ptr())) return std::nullopt;
    void* p = PyLong_AsVoidPtr(ptr.ptr());
    const long long bytes = PyLong_AsLongLong(nbytes.ptr());
    TensorRun& run = out.runs.back();
    const long long size = static_cast<long long>(dtypeSize(run.dtype));
    if (PyErr_Occurred() || bytes < 0 || bytes % size != 0) {
      PyErr_Clear();
      return std::nullopt;
    }
    const long long k = bytes / size;
    run.ptr.push_back(p);
    run.numel.push_back(k);
    run.total += k;
    out.total += k;
  }
  return out;
}

bool TensorReader::useTorchReader(uintptr_t read, int abi) {
  if (!bound_ || (read && abi != kTorchReaderAbi)) return false;
  torchRead_ = reinterpret_cast<TorchReadFn>(read);
  return true;
}

std::optional<TensorList> TensorReader::readWithTorch(PyObject* items, Py_ssize_t n) const {
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(PyTuple_GET_ITEM(items, i)));
    if (type != tensorType_ && type != parameterType_) return std::nullopt;
  }
  std::vector<TorchTensorInfo> info(static_cast<size_t>(n));
  if (n && torchRead_(&PyTuple_GET_ITEM(items, 0), n, info.data()) != n) return std::nullopt;
  TensorList out;
  out.count = size_t(n);
  int32_t runDtype = -1;
  for (const TorchTensorInfo& t : info) {
    if (t.dtype != runDtype) {
      runDtype = t.dtype;
      out.runs.push_back(TensorRun{static_cast<DType>(t.dtype), {}, {}, 0});
    }
    TensorRun& run = out.runs.back();
    run.ptr.push_back(t.ptr);
    run.numel.push_back(t.numel);
    run.total += t.numel;
    out.total += t.numel;
  }
  return out;
}

}  // namespace dtrain

// dtrain._C.kernels: the fused CPU kernels. Tensors arrive as data pointers and
// sizes (the extension does not link libtorch); dtrain/optim and dtrain/ops check devices,
// dtypes and contiguity before calling, or read a list of plain CPU tensors in C++
// (read_tensors, bindings/tensor_list.h). Every kernel call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstddef>

#include "bindings/tensor_list.h"
#include "common/error.h"
#include "kernels/cpu/nn.h"
#include "kernels/cpu/optim.h"
#include "kernels/cuda/planner.h"
#ifdef DTRAIN_WITH_CUDA
#include "kernels/cuda/launch.h"
#endif

namespace py = pybind11;
using namespace dtrain;
using namespace dtrain::kernels;

namespace {

// slots[s][i]: tensor i's pointer in slot s (slot-major, as Python builds them).
TensorLists lists(const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel, DType dt) {
  DTRAIN_CHECK(slots.size() <= size_t(kSlots), kConfig, "at most ", kSlots, " tensor slots, got ", slots.size());
  TensorLists t;
  t.dtype = dt;
  t.numel = numel;
  t.ptr.assign(numel.size(), {});
  for (size_t s = 0; s < slots.size(); ++s) {
    DTRAIN_CHECK(slots[s].size() == numel.size(), kConfig, "slot ", s, " lists ", slots[s].size(),
                 " tensors, the sizes ", numel.size());
    for (size_t i = 0; i < numel.size(); ++i) t.ptr[i][s] = reinterpret_cast<void*>(slots[s][i]);
  }
  return t;
}

}  // namespace

void bindKernels(py::module_& m) {
  py::enum_<Decay>(m, "Decay", "How Adam applies weight decay")
      .value("none", Decay::kNone).value("l2", Decay::kL2).value("decoupled", Decay::kDecoupled);
  py::enum_<Momentum>(m, "Momentum", "SGD's momentum buffer: none, created from this grad, or updated")
      .value("none", Momentum::kNone).value("first", Momentum::kFirst).value("later", Momentum::kLater);

  m.def("adam_step",
        [](const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel, DType dt, Decay decay,
           bool amsgrad, float gradScale, float beta1Comp, float beta2, float beta2Comp, float eps, float weightDecay,
           float decayFactor, float negStepSize, float invBc2Sqrt, bool checkFinite, int threads) {
          TensorLists t = lists(slots, numel, dt);
          AdamArgs a{gradScale, beta1Comp, beta2, beta2Comp, eps, weightDecay, decayFactor, negStepSize, invBc2Sqrt};
          py::gil_scoped_release nogil;
          return adamStep(t, decay, amsgrad, a, checkFinite, threads);
        },
        py::arg("slots"), py::arg("numel"), py::arg("dtype"), py::arg("decay"), py::arg("amsgrad"),
        py::arg("grad_scale"), py::arg("beta1_comp"), py::arg("beta2"), py::arg("beta2_comp"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decay_factor"), py::arg("neg_step_size"), py::arg("inv_bc2_sqrt"),
        py::arg("check_finite"), py::arg("threads"),
        "One Adam/AdamW step over every tensor (slots: params, grads, exp_avg, exp_avg_sq[, max_exp_avg_sq]). "
        "Returns True, updating nothing, when check_finite and a grad holds inf/NaN.");
  m.def("sgd_step",
        [](const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel, DType dt, bool l2,
           Momentum momentum, bool nesterov, float gradScale, float weightDecay, float mom, float dampComp,
           float negLr, bool checkFinite, int threads) {
          TensorLists t = lists(slots, numel, dt);
          SgdArgs a{gradScale, weightDecay, mom, dampComp, negLr};
          py::gil_scoped_release nogil;
          return sgdStep(t, l2, momentum, nesterov, a, checkFinite, threads);
        },
        py::arg("slots"), py::arg("numel"), py::arg("dtype"), py::arg("l2"), py::arg("momentum"),
        py::arg("nesterov"), py::arg("grad_scale"), py::arg("weight_decay"), py::arg("momentum_factor"),
        py::arg("damp_comp"), py::arg("neg_lr"), py::arg("check_finite"), py::arg("threads"),
        "One SGD step over every tensor (slots: params, grads[, momentum_buffer]). Returns True, updating "
        "nothing, when check_finite and a grad holds inf/NaN.");
  auto ptrs = [](const std::vector<uintptr_t>& v) {
    std::vector<void*> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = reinterpret_cast<void*>(v[i]);
    return out;
  };
  m.def("pack",
        [ptrs](const std::vector<uintptr_t>& src, const std::vector<int64_t>& numel, DType srcType, uintptr_t flat,
               DType flatType, float scale, int threads) {
          std::vector<void*> p = ptrs(src);
          std::vector<const void*> in(p.begin(), p.end());
          py::gil_scoped_release nogil;
          packTensors(in, numel, srcType, reinterpret_cast<void*>(flat), flatType, scale, threads);
        },
        py::arg("src"), py::arg("numel"), py::arg("src_dtype"), py::arg("flat"), py::arg("flat_dtype"),
        py::arg("scale"), py::arg("threads"),
        "Copies the tensors back to back into `flat`, cast to flat_dtype and multiplied by scale, in one pass.");
  m.def("unpack",
        [ptrs](uintptr_t flat, DType flatType, const std::vector<uintptr_t>& dst, const std::vector<int64_t>& numel,
               DType dstType, float scale, bool accumulate, int threads) {
          std::vector<void*> out = ptrs(dst);
          py::gil_scoped_release nogil;
          unpackTensors(reinterpret_cast<const void*>(flat), flatType, out, numel, dstType, scale, accumulate,
                        threads);
        },
        py::arg("flat"), py::arg("flat_dtype"), py::arg("dst"), py::arg("numel"), py::arg("dst_dtype"),
        py::arg("scale"), py::arg("accumulate"), py::arg("threads"),
        "Copies `flat` back into the tensors, cast to dst_dtype and multiplied by scale; adds when accumulate.");
  m.def("norm",
        [ptrs](const std::vector<uintptr_t>& x, const std::vector<int64_t>& numel, DType dt, int threads) {
          std::vector<void*> p = ptrs(x);
          std::vector<const void*> in(p.begin(), p.end());
          NormPart r;
          {
            py::gil_scoped_release nogil;
            r = multiTensorNorm(in, numel, dt, threads);
          }
          return py::make_tuple(r.sumSq, r.maxAbs, r.nan);
        },
        py::arg("x"), py::arg("numel"), py::arg("dtype"), py::arg("threads"),
        "(sum of squares in double, max |x|, any NaN) over all the tensors, in one pass each.");
  // The same three on a TensorList read in C++ (bindings/tensor_list.h).
  static TensorReader reader;
  py::class_<TensorList>(m, "TensorList", "CPU tensors' pointers and sizes, in runs of one dtype")
      .def_readonly("total", &TensorList::total, "elements over all the tensors")
      .def_readonly("count", &TensorList::count, "tensors")
      .def_property_readonly(
          "dtypes",
          [](const TensorList& t) {
            std::vector<DType> out;
            for (const TensorRun& r : t.runs) out.push_back(r.dtype);
            return out;
          },
          "each run's dtype");
  m.def("bind_tensor_type",
        [](py::handle tensorType, py::handle parameterType, py::dict dtypes) {
          return reader.bind(tensorType, parameterType, dtypes);
        },
        py::arg("tensor_type"), py::arg("parameter_type"), py::arg("dtypes"),
        "Takes torch.Tensor's descriptors for read_tensors; False when they are not what it expects.");
  m.def("use_torch_reader", [](uintptr_t read, int abi) { return reader.useTorchReader(read, abi); },
        py::arg("read"), py::arg("abi"),
        "Reads tensors through `read` (the address of csrc/jit/torch_reader.cc's dtrain_torch_read, built for "
        "reader ABI `abi`) from now on (0: through torch.Tensor's descriptors again); False when bind_tensor_type "
        "has not succeeded or the ABI differs.");
  m.def("using_torch_reader", [] { return reader.usingTorchReader(); },
        "True once use_torch_reader has taken a reader.");
  m.attr("TORCH_READER_ABI") = kTorchReaderAbi;
  m.def("read_tensors",
        [](py::handle seq) -> py::object {
          std::optional<TensorList> t = reader.read(seq);
          return t ? py::cast(std::move(*t)) : py::none();
        },
        py::arg("tensors"),
        "The tensors of a list or tuple as a TensorList, or None when one is not a contiguous float32/fp16/bf16 "
        "CPU torch.Tensor or Parameter (the caller checks those itself).");
  auto consts = [](const std::vector<void*>& p) { return std::vector<const void*>(p.begin(), p.end()); };
  m.def("pack_list",
        [consts](const TensorList& t, uintptr_t flat, DType flatType, float scale, int threads) {
          py::gil_scoped_release nogil;
          auto* out = reinterpret_cast<uint8_t*>(flat);
          for (const TensorRun& r : t.runs) {
            packTensors(consts(r.ptr), r.numel, r.dtype, out, flatType, scale, threads);
            out += r.total * int64_t(dtypeSize(flatType));
          }
        },
        py::arg("tensors"), py::arg("flat"), py::arg("flat_dtype"), py::arg("scale"), py::arg("threads"),
        "pack over a TensorList (every run, back to back).");
  m.def("unpack_list",
        [](uintptr_t flat, DType flatType, const TensorList& t, float scale, bool accumulate, int threads) {
          py::gil_scoped_release nogil;
          const auto* in = reinterpret_cast<const uint8_t*>(flat);
          for (const TensorRun& r : t.runs) {
            unpackTensors(in, flatType, r.ptr, r.numel, r.dtype, scale, accumulate, threads);
            in += r.total * int64_t(dtypeSize(flatType));
          }
        },
        py::arg("flat"), py::arg("flat_dtype"), py::arg("tensors"), py::arg("scale"), py::arg("accumulate"),
        py::arg("threads"), "unpack into a TensorList's tensors.");
  m.def("norm_list",
        [consts](const TensorList& t, int threads) {
          NormPart all;
          {
            py::gil_scoped_release nogil;
            for (const TensorRun& r : t.runs) {
              const NormPart q = multiTensorNorm(consts(r.ptr), r.numel, r.dtype, threads);
              all.sumSq += q.sumSq;
              all.maxAbs = q.maxAbs > all.maxAbs ? q.maxAbs : all.maxAbs;
              all.nan = all.nan || q.nan;
            }
          }
          return py::make_tuple(all.sumSq, all.maxAbs, all.nan);
        },
        py::arg("tensors"), py::arg("threads"), "norm over a TensorList's tensors, every run together.");
  m.def("scale_list",
        [](const TensorList& t, float scale, int threads) {
          py::gil_scoped_release nogil;
          // Threads scale pieces side by side: two tensors sharing memory (the same one
          // twice, overlapping views) would race, and torch scales those twice in turn.
          std::vector<std::pair<uintptr_t, uintptr_t>> spans;
          for (const TensorRun& r : t.runs)
            for (size_t i = 0; i < r.ptr.size(); ++i)
              if (r.numel[i] > 0) {
                const auto b = reinterpret_cast<uintptr_t>(r.ptr[i]);
                spans.emplace_back(b, b + uintptr_t(r.numel[i]) * dtypeSize(r.dtype));
              }
          std::sort(spans.begin(), spans.end());
          for (size_t i = 1; i < spans.size(); ++i)
            if (spans[i].first < spans[i - 1].second) return false;
          for (const TensorRun& r : t.runs) scaleTensors(r.ptr, r.numel, r.dtype, scale, threads);
          return true;
        },
        py::arg("tensors"), py::arg("scale"), py::arg("threads"),
        "Multiplies a TensorList's tensors by scale in place (in float32, rounded to each one's dtype). Returns "
        "False, touching nothing, when two of them share memory (the caller scales those one by one).");
  auto P = [](uintptr_t p) { return reinterpret_cast<void*>(p); };
  m.def("gelu_forward",
        [P](DType dt, uintptr_t x, uintptr_t b, uintptr_t y, int64_t rows, int64_t n, int threads) {
          py::gil_scoped_release nogil;
          geluForward(dt, P(x), P(b), P(y), rows, n, threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("n"),
        py::arg("threads"), "y = gelu(x + bias) over [rows, n] (exact GELU, erf form).");
  m.def("gelu_backward",
        [P](DType dt, uintptr_t dy, uintptr_t x, uintptr_t b, uintptr_t dx, uintptr_t db, int64_t rows, int64_t n,
            int threads) {
          py::gil_scoped_release nogil;
          geluBackward(dt, P(dy), P(x), P(b), P(dx), P(db), rows, n, threads);
        },
        py::arg("dtype"), py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"), py::arg("dbias"),
        py::arg("rows"), py::arg("n"), py::arg("threads"), "dx = dy * gelu'(x + bias) and dbias = its column sums.");
  m.def("layer_norm_forward",
        [P](DType dt, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean, uintptr_t rstd, int64_t rows,
            int64_t n, double eps, int threads) {
          py::gil_scoped_release nogil;
          layerNormForward(dt, P(x), P(w), P(b), P(y), P(mean), P(rstd), rows, n, eps, threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("mean"),
        py::arg("rstd"), py::arg("rows"), py::arg("n"), py::arg("eps"), py::arg("threads"),
        "LayerNorm over the last n elements of each row; weight/bias may be 0 (absent).");
  m.def("layer_norm_backward",
        [P](DType dt, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t rstd, uintptr_t dx,
            uintptr_t dw, uintptr_t db, int64_t rows, int64_t n, int threads) {
          py::gil_scoped_release nogil;
          layerNormBackward(dt, P(dy), P(x), P(w), P(mean), P(rstd), P(dx), P(dw), P(db), rows, n, threads);
        },
        py::arg("dtype"), py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        py::arg("dx"), py::arg("dweight"), py::arg("dbias"), py::arg("rows"), py::arg("n"), py::arg("threads"),
        "LayerNorm's backward: dx, and dweight/dbias when their pointers are not 0.");
  // Launch planning for the run-time (NVRTC) path: the same blocks the nvcc launchers use.
  m.def("cuda_plan",
        [](const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel) {
          TensorLists t = lists(slots, numel, DType::kFloat32);
          std::vector<std::pair<py::bytes, int>> out;
          cuda::forEachLaunch(t, static_cast<int>(slots.size()), [&](const cuda::Launch& L, int blocks) {
            out.emplace_back(py::bytes(reinterpret_cast<const char*>(&L), sizeof(L)), blocks);
          });
          return out;
        },
        py::arg("slots"), py::arg("numel"),
        "The multi-tensor launches for these tensors: (Launch block as bytes, block count) each.");
  m.def("cuda_layout", [] {
    py::dict d;
    d["launch_size"] = sizeof(cuda::Launch);
    d["numel_offset"] = offsetof(cuda::Launch, numel);
    d["block_tensor_offset"] = offsetof(cuda::Launch, blockTensor);
    d["block_chunk_offset"] = offsetof(cuda::Launch, blockChunk);
    d["adam_args_size"] = sizeof(AdamArgs);
    d["sgd_args_size"] = sizeof(SgdArgs);
    d["max_tensors"] = cuda::kMaxTensors;
    d["max_blocks"] = cuda::kMaxBlocks;
    d["chunk"] = cuda::kChunk;
    d["threads"] = cuda::kThreads;
    d["col_tile"] = cuda::kColTile;
    d["col_rows"] = cuda::kColRows;
    d["rows_per_warp_block"] = cuda::kRowsPerWarpBlock;
    return d;
  }, "The CUDA kernels' launch geometry and argument layout (plan.h), for the NVRTC path.");
  m.def("cuda_col_chunks", [](int64_t rows) { return cuda::colChunks(rows); }, py::arg("rows"),
        "Row chunks of a column reduction over `rows` rows (the partial-sum buffer's rows).");
  m.def("cuda_total_blocks", [](const std::vector<int64_t>& numel) { return cuda::totalBlocks(numel); },
        py::arg("numel"), "Blocks of all multi-tensor launches over these sizes (a norm's partial sums).");
#ifdef DTRAIN_WITH_CUDA
  m.attr("cuda_built") = true;
  auto cudaCheck = [] {
    const char* e = cuda::lastError();
    DTRAIN_CHECK(e[0] == 0, kConfig, "a CUDA kernel launch failed: ", e);
  };
  m.def("adam_step_cuda",
        [cudaCheck](const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel, DType dt,
                    Decay decay, bool amsgrad, float gradScale, float beta1Comp, float beta2, float beta2Comp,
                    float eps, float weightDecay, float decayFactor, float negStepSize, float invBc2Sqrt,
                    uintptr_t foundInf, uintptr_t stream) {
          TensorLists t = lists(slots, numel, dt);
          AdamArgs a{gradScale, beta1Comp, beta2, beta2Comp, eps, weightDecay, decayFactor, negStepSize, invBc2Sqrt};
          cuda::adamStep(t, decay, amsgrad, a, reinterpret_cast<const float*>(foundInf), stream);
          cudaCheck();
        },
        "adam_step on CUDA tensors, launched on `stream`; found_inf: a device float pointer or 0.");
  m.def("sgd_step_cuda",
        [cudaCheck](const std::vector<std::vector<uintptr_t>>& slots, const std::vector<int64_t>& numel, DType dt,
                    bool l2, Momentum momentum, bool nesterov, float gradScale, float weightDecay, float mom,
                    float dampComp, float negLr, uintptr_t foundInf, uintptr_t stream) {
          TensorLists t = lists(slots, numel, dt);
          SgdArgs a{gradScale, weightDecay, mom, dampComp, negLr};
          cuda::sgdStep(t, l2, momentum, nesterov, a, reinterpret_cast<const float*>(foundInf), stream);
          cudaCheck();
        },
        "sgd_step on CUDA tensors, launched on `stream`; found_inf: a device float pointer or 0.");
  m.def("pack_cuda",
        [ptrs, cudaCheck](const std::vector<uintptr_t>& src, const std::vector<int64_t>& numel, DType srcType,
                          uintptr_t flat, DType flatType, float scale, uintptr_t stream) {
          std::vector<void*> p = ptrs(src);
          cuda::pack(std::vector<const void*>(p.begin(), p.end()), numel, srcType, reinterpret_cast<void*>(flat),
                     flatType, scale, stream);
          cudaCheck();
        },
        "pack on CUDA tensors, launched on `stream`.");
  m.def("unpack_cuda",
        [ptrs, cudaCheck](uintptr_t flat, DType flatType, const std::vector<uintptr_t>& dst,
                          const std::vector<int64_t>& numel, DType dstType, float scale, bool accumulate,
                          uintptr_t stream) {
          cuda::unpack(reinterpret_cast<const void*>(flat), flatType, ptrs(dst), numel, dstType, scale, accumulate,
                       stream);
          cudaCheck();
        },
        "unpack on CUDA tensors, launched on `stream`.");
  m.def("norm_cuda",
        [ptrs, cudaCheck](const std::vector<uintptr_t>& x, const std::vector<int64_t>& numel, DType dt,
                          uintptr_t partSq, uintptr_t partMax, bool inf, uintptr_t out, uintptr_t stream) {
          std::vector<void*> p = ptrs(x);
          cuda::norm(std::vector<const void*>(p.begin(), p.end()), numel, dt, reinterpret_cast<double*>(partSq),
                     reinterpret_cast<float*>(partMax), inf, reinterpret_cast<float*>(out), stream);
          cudaCheck();
        },
        "multi_tensor_norm on CUDA tensors into the device float `out`, launched on `stream`.");
  auto V = [](uintptr_t p) { return reinterpret_cast<void*>(p); };
  auto F = [](uintptr_t p) { return reinterpret_cast<float*>(p); };
  m.def("gelu_forward_cuda",
        [V, cudaCheck](DType dt, uintptr_t x, uintptr_t b, uintptr_t y, int64_t rows, int64_t n, uintptr_t stream) {
          cuda::geluForward(dt, V(x), V(b), V(y), rows, n, stream);
          cudaCheck();
        });
  m.def("gelu_backward_cuda",
        [V, F, cudaCheck](DType dt, uintptr_t dy, uintptr_t x, uintptr_t b, uintptr_t dx, uintptr_t db,
                          uintptr_t part, int64_t rows, int64_t n, uintptr_t stream) {
          cuda::geluBackward(dt, V(dy), V(x), V(b), V(dx), V(db), F(part), rows, n, stream);
          cudaCheck();
        });
  m.def("layer_norm_forward_cuda",
        [V, F, cudaCheck](DType dt, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t mean,
                          uintptr_t rstd, int64_t rows, int64_t n, float eps, uintptr_t stream) {
          cuda::layerNormForward(dt, V(x), V(w), V(b), V(y), F(mean), F(rstd), rows, n, eps, stream);
          cudaCheck();
        });
  m.def("layer_norm_backward_cuda",
        [V, F, cudaCheck](DType dt, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t mean, uintptr_t rstd,
                          uintptr_t dx, uintptr_t dw, uintptr_t db, uintptr_t part, int64_t rows, int64_t n,
                          uintptr_t stream) {
          cuda::layerNormBackward(dt, V(dy), V(x), V(w), F(mean), F(rstd), V(dx), V(dw), V(db), F(part), rows, n,
                                  stream);
          cudaCheck();
        });
#else
  m.attr("cuda_built") = false;
#endif
  m.def("isa", &optimIsa, "The instruction set the CPU kernels run: avx512, avx2 or generic.");
}

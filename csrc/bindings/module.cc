// The only PYBIND11_MODULE. Every blocking call releases the GIL; tensors
// arrive as (address, element count, dtype) from dtrain/comm, which keeps them
// alive until the call (or its Work) is done.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <memory>
#include <optional>
#include <thread>

#include "collectives/algorithms.h"
#include "collectives/group.h"
#include "collectives/progress.h"
#include "collectives/reduce_kernels.h"
#include "common/error.h"
#include "common/half.h"
#include "common/hmac.h"
#include "transport/loopback.h"
#include "transport/mesh.h"

namespace py = pybind11;
using namespace dtrain;

void bindData(py::module_& m);  // bindings/data.cc
void bindKernels(py::module_& m);  // bindings/kernels.cc
void bindPs(py::module_& m);  // bindings/ps.cc

namespace {

using Ptr = uintptr_t;
inline void* P(Ptr p) { return reinterpret_cast<void*>(p); }
using Release = py::call_guard<py::gil_scoped_release>;

// The world's mesh and its progress thread; groups keep it alive.
struct World {
  explicit World(const MeshOptions& o) : mesh(o) {}
  Mesh mesh;
  Executor executor;
};

struct PyGroup {
  std::shared_ptr<World> world;
  std::unique_ptr<Group> group;

  // Runs `fn` now (async=false: returns None) or on the progress thread (returns a Work).
  py::object dispatch(bool async, std::function<void()> fn) {
    if (!async) {
      {
        py::gil_scoped_release nogil;
        world->executor.run(std::move(fn));
      }
      return py::none();
    }
    return py::cast(world->executor.submit(std::move(fn)));
  }
};

Hierarchy parseHierarchy(const std::string& s) {
  if (s == "auto") return Hierarchy::kAuto;
  if (s == "flat") return Hierarchy::kFlat;
  if (s == "hierarchical") return Hierarchy::kHierarchical;
  DTRAIN_THROW(kConfig, "hierarchy='", s, "' is not one of 'auto', 'flat', 'hierarchical'");
}

const char* hierarchyName(Hierarchy h) {
  return h == Hierarchy::kAuto ? "auto" : h == Hierarchy::kFlat ? "flat" : "hierarchical";
}

std::vector<std::unique_ptr<Pair>> loopbackPairs(LoopbackFabric* fabric, int rank, int world) {
  std::vector<std::unique_ptr<Pair>> pairs(world);
  for (int j = 0; j < world; ++j)
    if (j != rank) pairs[j] = std::make_unique<LoopbackPair>(fabric, rank, j);
  return pairs;
}

// Runs one collective on `world` threads over the loopback fake. Buffers are
// per rank; `counts` is per rank for allgather and alltoall (equal blocks).
void loopbackRun(int world, const std::string& op, const std::vector<Ptr>& in, const std::vector<Ptr>& out,
                 const std::vector<uint64_t>& counts, DType dt, RedOp redop, std::optional<DType> wireOpt,
                 int root, size_t ringBytes, uint64_t smallBytes, const std::vector<int>& hosts,
                 const std::string& hierarchy) {
  const DType wire = wireOpt.value_or(dt);
  LoopbackFabric fabric(world, ringBytes);
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        Mesh mesh(r, world, loopbackPairs(&fabric, r, world), hosts);
        std::vector<int> ranks(world);
        for (int i = 0; i < world; ++i) ranks[i] = i;
        Group g(&mesh, ranks, 0, "loopback", 30.0);
        g.setSmallBytes(smallBytes);
        g.setCompressWire(true);
        g.setHierarchy(parseHierarchy(hierarchy));
        if (op == "allreduce") g.allreduce(P(in[r]), counts[r], dt, redop, wire);
        else if (op == "broadcast") g.broadcast(P(in[r]), counts[r], dt, root);
        else if (op == "allgather") g.allgather(P(in[r]), P(out[r]), counts, dt);
        else if (op == "reduce_scatter") g.reduceScatter(P(in[r]), P(out[r]), counts[r], dt, redop, wire);
        else if (op == "alltoall") {
          std::vector<uint64_t> c(world, counts[r]);
          g.alltoall(P(in[r]), c, P(out[r]), c, dt);
        } else if (op == "barrier") g.barrier();
        else DTRAIN_THROW(kConfig, "unknown loopback op ", op);
      } catch (...) {
        errors[r] = std::current_exception();
        fabric.poison(r);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dtrain's C++ core: transports, collectives and kernels";

  // dtrain.errors is imported first by dtrain/__init__; map each kind to its class.
  // Leaked on purpose: it must outlive interpreter shutdown, when translators may still run.
  static py::handle errors = py::module_::import("dtrain.errors").release();
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      const char* cls = "CommError";
      switch (e.kind()) {
        case ErrorKind::kComm: cls = "CommError"; break;
        case ErrorKind::kTimeout: cls = "CommTimeout"; break;
        case ErrorKind::kRendezvous: cls = "RendezvousError"; break;
        case ErrorKind::kConfig: cls = "ConfigError"; break;
        case ErrorKind::kData: cls = "DataError"; break;
      }
      PyErr_SetString(errors.attr(cls).ptr(), e.what());
    }
  });

  py::enum_<DType>(m, "DType", "Element types of the native backend")
      .value("float32", DType::kFloat32).value("float64", DType::kFloat64)
      .value("float16", DType::kFloat16).value("bfloat16", DType::kBFloat16)
      .value("int32", DType::kInt32).value("int64", DType::kInt64).value("uint8", DType::kUInt8);
  py::enum_<RedOp>(m, "RedOp", "Reduction operators")
      .value("sum", RedOp::kSum).value("avg", RedOp::kAvg).value("min", RedOp::kMin)
      .value("max", RedOp::kMax).value("prod", RedOp::kProd);
  m.def("dtype_size", [](DType t) { return dtypeSize(t); }, "Bytes per element of `dtype`.");

  py::class_<Work, std::shared_ptr<Work>>(m, "Work", "Handle of an asynchronous call")
      .def("wait", [](Work& w, std::optional<double> t) { return w.wait(t ? *t : -1.0); },
           py::arg("timeout") = py::none(), Release(),
           "Waits up to `timeout` seconds (None: until done). Returns False if the call is still "
           "running; raises the call's error if it failed.")
      .def("is_completed", &Work::completed, "True once the call has finished (or failed).")
      .def_property_readonly("times", [](Work& w) { return std::make_pair(w.startedAt(), w.finishedAt()); },
                             "(started, finished) on the progress thread, in time.monotonic() seconds; 0 until then.");

  py::class_<World, std::shared_ptr<World>>(m, "World", "The world's connections and progress thread")
      .def(py::init([](int rank, int size, const std::string& addr, int port, const std::string& token,
                       double timeout, int storeFd, const std::string& transport, const std::string& hostId,
                       size_t shmBytes, size_t tcpBytes) {
             MeshOptions o;
             o.rank = rank; o.size = size; o.masterAddr = addr; o.masterPort = port; o.token = token;
             o.timeout = timeout; o.storeFd = storeFd; o.transport = transport; o.hostId = hostId;
             o.shmBytes = shmBytes; o.tcpBytes = tcpBytes;
             return std::make_shared<World>(o);
           }),
           py::arg("rank"), py::arg("size"), py::arg("master_addr"), py::arg("master_port"),
           py::arg("token"), py::arg("timeout"), py::arg("store_fd") = -1, py::arg("transport") = "auto",
           py::arg("host_id") = "", py::arg("shm_bytes") = size_t(4) << 20,
           py::arg("tcp_bytes") = size_t(4) << 20, Release(),
           "Rendezvous with every rank and connect (shared memory on this host, TCP across hosts).")
      .def_property_readonly("rank", [](World& w) { return w.mesh.rank(); })
      .def_property_readonly("size", [](World& w) { return w.mesh.size(); })
      .def_property_readonly("local_rank", [](World& w) { return w.mesh.localRank(); })
      .def_property_readonly("local_size", [](World& w) { return w.mesh.localSize(); })
      .def_property_readonly("host_id", [](World& w) { return w.mesh.hostId(); })
      .def("transport_to", [](World& w, int r) -> std::string {
             Pair* p = w.mesh.pair(r);
             return p ? p->kind() : "self";
           }, "The transport used to reach global rank `r`: shm, tcp or self.")
      .def_property_readonly("refused_connections", [](World& w) { return w.mesh.refusedConnections(); },
                             "Connections the rendezvous store refused (rank 0 only).")
      .def("broken", [](World& w) -> std::optional<std::string> {
             std::string why;
             if (w.mesh.broken(&why)) return why;
             return std::nullopt;
           }, "Why communication broke, or None.")
      .def("abort", [](World& w, const std::string& why) { w.mesh.breakWith(why); },
           "Marks the world broken and tells the other ranks (they raise CommError naming this rank).");

  py::class_<PyGroup>(m, "Group", "A communicator over a subset of the world")
      .def(py::init([](std::shared_ptr<World> w, std::vector<int> ranks, uint32_t id, const std::string& name,
                       double timeout) {
             auto g = std::make_unique<Group>(&w->mesh, std::move(ranks), id, name, timeout);
             return PyGroup{std::move(w), std::move(g)};
           }),
           py::arg("world"), py::arg("ranks"), py::arg("id"), py::arg("name"), py::arg("timeout"))
      .def_property_readonly("rank", [](PyGroup& g) { return g.group->rank(); })
      .def_property_readonly("size", [](PyGroup& g) { return g.group->size(); })
      .def_property_readonly("ranks", [](PyGroup& g) { return g.group->ranks(); })
      .def_property_readonly("name", [](PyGroup& g) { return g.group->name(); })
      .def_property("timeout", [](PyGroup& g) { return g.group->timeout(); },
                    [](PyGroup& g, double t) { g.group->setTimeout(t); })
      .def_property("compress_wire", [](PyGroup& g) { return g.group->compressesWire(); },
                    [](PyGroup& g, bool on) { g.group->setCompressWire(on); },
                    "Whether compression='fp16'/'bf16' converts on the wire in this group (False when all "
                    "members share memory on one host, unless DTRAIN_SHM_COMPRESSION=1).")
      .def_property("small_bytes", [](PyGroup& g) { return g.group->smallBytes(); },
                    [](PyGroup& g, uint64_t b) { g.group->setSmallBytes(b); })
      .def_property("hierarchy", [](PyGroup& g) { return std::string(hierarchyName(g.group->hierarchy())); },
                    [](PyGroup& g, const std::string& h) { g.group->setHierarchy(parseHierarchy(h)); },
                    "How allreduce crosses hosts: 'auto' or 'hierarchical' (hierarchical where the layout "
                    "allows it) or 'flat' (one ring). Default from DTRAIN_HIERARCHICAL.")
      .def("entered", [](PyGroup& g) { return g.group->entered(); },
           "The call number each member last entered here (-1: not visible from this host).")
      .def_property_readonly("hierarchical_layout", [](PyGroup& g) { return g.group->hierarchicalLayout(); },
                             "True when members sit on 2+ hosts with the same number (2+) on each.")
      .def("allreduce", [](PyGroup& g, Ptr buf, uint64_t n, DType dt, RedOp op, DType wire, bool async,
                           uint64_t tag) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { CallTag t(tag); G->allreduce(P(buf), n, dt, op, wire); });
           }, "In-place allreduce of `n` elements at `buf`; `wire` != dtype compresses; `tag` (shape_tag) "
              "must match on every rank.",
           py::arg("buf"), py::arg("n"), py::arg("dtype"), py::arg("op"), py::arg("wire"), py::arg("async_op"),
           py::arg("tag") = 0)
      .def("broadcast", [](PyGroup& g, Ptr buf, uint64_t n, DType dt, int root, bool async, uint64_t tag) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { CallTag t(tag); G->broadcast(P(buf), n, dt, root); });
           }, "In-place broadcast from group rank `root`; `tag` (shape_tag) must match on every rank.",
           py::arg("buf"), py::arg("n"), py::arg("dtype"), py::arg("root"), py::arg("async_op"), py::arg("tag") = 0)
      .def("allgather", [](PyGroup& g, Ptr in, Ptr out, std::vector<uint64_t> counts, DType dt, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->allgather(P(in), P(out), counts, dt); });
           }, "Gathers counts[i] elements from each rank i into `out`, in rank order.")
      .def("reduce_scatter", [](PyGroup& g, Ptr in, Ptr out, uint64_t n, DType dt, RedOp op, DType wire, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->reduceScatter(P(in), P(out), n, dt, op, wire); });
           }, "Reduces size()*n elements and leaves block `rank` (n elements) in `out`.")
      .def("alltoall", [](PyGroup& g, Ptr in, std::vector<uint64_t> sc, Ptr out, std::vector<uint64_t> rc,
                          DType dt, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->alltoall(P(in), sc, P(out), rc, dt); });
           }, "Sends block i of `in` to rank i and receives block i of `out` from it.")
      .def("send", [](PyGroup& g, Ptr buf, uint64_t n, DType dt, int dst, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->send(P(buf), n, dt, dst); });
           }, "Sends `n` elements to group rank `dst`.")
      .def("recv", [](PyGroup& g, Ptr buf, uint64_t n, DType dt, int src, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->recv(P(buf), n, dt, src); });
           }, "Receives `n` elements from group rank `src`.")
      .def("sendrecv", [](PyGroup& g, Ptr sbuf, uint64_t sn, int dst, Ptr rbuf, uint64_t rn, int src, DType dt,
                          bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->sendRecv(P(sbuf), sn, dst, P(rbuf), rn, src, dt); });
           }, "Sends `sn` elements to `dst` and receives `rn` from `src` in one call (-1: no such leg).")
      .def("barrier", [](PyGroup& g, bool async) {
             Group* G = g.group.get();
             return g.dispatch(async, [=] { G->barrier(); });
           }, "Returns once every rank of the group has entered the barrier.");

  // ---- testing and kernel entry points ----
  m.def("loopback_run", &loopbackRun, py::arg("world"), py::arg("op"), py::arg("inputs"), py::arg("outputs"),
        py::arg("counts"), py::arg("dtype"), py::arg("redop") = RedOp::kSum, py::arg("wire") = py::none(),
        py::arg("root") = 0, py::arg("ring_bytes") = size_t(1) << 16, py::arg("small_bytes") = uint64_t(0),
        py::arg("hosts") = std::vector<int>{}, py::arg("hierarchy") = "auto", Release(),
        "Runs one collective on `world` threads over the in-process loopback transport (unit tests). "
        "small_bytes=0 forces the ring allreduce; hosts[r] places rank r on a host (default: one each).");
  m.def("shape_tag", [](const std::vector<int64_t>& shape) { return shapeTag(shape); },
        "A tensor shape as the 64-bit check collectives compare across ranks (tag=).");
  m.def("describe_shape_tag", &describeShapeTag, "How errors name a shape_tag.");
  m.def("ring_segments", [](uint64_t count, int n) {
          std::vector<std::pair<uint64_t, uint64_t>> out;
          for (int s = 0; s < n; ++s) out.emplace_back(ringSegStart(count, n, s), ringSegCount(count, n, s));
          return out;
        }, "(start, count) of each ring segment for `count` elements over `n` ranks.");
  m.def("kernel_isa", [] { return std::string(kernels().isa); }, "Instruction set of the reduce kernels in use.");
  m.def("set_kernel_isa", [](const std::string& s) { return setKernelIsa(s.c_str()); },
        "Pins the kernel table (generic, avx2, avx512); False if this CPU lacks it.");
  m.def("reduce_into", [](DType dt, RedOp op, Ptr dst, Ptr src, size_t n) { kernels().reduce(dt, op, P(dst), P(src), n); },
        Release(), "dst[i] = dst[i] op src[i].");
  m.def("encode_wire", [](DType w, Ptr dst, Ptr src, size_t n) {
          kernels().encode(w, P(dst), static_cast<const float*>(P(src)), n);
        }, Release(), "float32 -> fp16/bf16, round to nearest even.");
  m.def("decode_wire", [](DType w, Ptr dst, Ptr src, size_t n) {
          kernels().decode(w, static_cast<float*>(P(dst)), P(src), n);
        }, Release(), "fp16/bf16 -> float32.");
  m.def("hmac_sha256", [](const std::string& key, const py::bytes& msg) {
          std::string s = msg;
          Digest d = hmacSha256(key, s.data(), s.size());
          return py::bytes(reinterpret_cast<const char*>(d.data()), d.size());
        }, "HMAC-SHA256, as used by the job-token handshake.");

  auto data = m.def_submodule("data", "TFRecord input: framing, CRC-32C, zlib/gzip, Example parsing");
  bindData(data);
  auto kernels = m.def_submodule("kernels", "Fused multi-tensor kernels (optimizers) on the CPU");
  bindKernels(kernels);
  auto ps = m.def_submodule("ps", "The parameter server and its worker-side client");
  bindPs(ps);
}

// dtrain._C.ps: the parameter server and its worker-side client. Buffers arrive as
// data pointers (dtrain/parallel/param_server.py keeps the tensors alive); every
// blocking call releases the GIL, and the server's own threads never take it.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "common/error.h"
#include "ps/client.h"
#include "ps/server.h"
#include "transport/tcp/socket.h"

namespace py = pybind11;
using namespace dtrain;
using namespace dtrain::ps;

namespace {

using Ptr = uintptr_t;
template <typename T>
T* P(Ptr p) { return reinterpret_cast<T*>(p); }
using Release = py::call_guard<py::gil_scoped_release>;

GroupSlice sliceFrom(const py::dict& d) {
  GroupSlice g;
  g.begin = d["begin"].cast<uint64_t>();
  g.end = d["end"].cast<uint64_t>();
  g.group = d["group"].cast<int>();
  g.lr = d["lr"].cast<double>();
  g.weightDecay = d["weight_decay"].cast<double>();
  g.momentum = d.contains("momentum") ? d["momentum"].cast<double>() : 0.0;
  g.dampening = d.contains("dampening") ? d["dampening"].cast<double>() : 0.0;
  g.nesterov = d.contains("nesterov") && d["nesterov"].cast<bool>();
  g.maximize = d.contains("maximize") && d["maximize"].cast<bool>();
  if (d.contains("betas")) {
    auto b = d["betas"].cast<std::pair<double, double>>();
    g.beta1 = b.first;
    g.beta2 = b.second;
  }
  if (d.contains("eps")) g.eps = d["eps"].cast<double>();
  g.step = d.contains("step") ? d["step"].cast<int64_t>() : 0;
  g.momentumStarted = d.contains("momentum_started") && d["momentum_started"].cast<bool>();
  return g;
}

py::dict progressOf(const GroupSlice& g) {
  py::dict d;
  d["group"] = g.group;
  d["begin"] = g.begin;
  d["end"] = g.end;
  d["step"] = g.step;
  d["momentum_started"] = g.momentumStarted;
  d["lr"] = g.lr;
  return d;
}

}  // namespace

void bindPs(py::module_& m) {
  py::class_<Server>(m, "Server", "A parameter server for one contiguous shard of the flat parameters")
      .def(py::init([](const std::string& token, const std::string& optimizer, int numWorkers, int numGroups,
                       int firstWorkerRank, int rank, int staleness, double timeout, uint64_t layoutHash,
                       const std::string& bindHost, const std::vector<py::dict>& groups, Ptr params, uint64_t count) {
             ServerOptions o;
             o.token = token; o.optimizer = optimizer; o.numWorkers = numWorkers; o.numGroups = numGroups;
             o.firstWorkerRank = firstWorkerRank; o.rank = rank; o.staleness = staleness; o.timeout = timeout;
             o.layoutHash = layoutHash; o.bindHost = bindHost;
             std::vector<GroupSlice> slices;
             for (const auto& d : groups) slices.push_back(sliceFrom(d));
             py::gil_scoped_release nogil;
             return std::make_unique<Server>(o, std::move(slices), P<float>(params), count);
           }),
           py::arg("token"), py::arg("optimizer"), py::arg("num_workers"), py::arg("num_groups"),
           py::arg("first_worker_rank"), py::arg("rank"), py::arg("staleness"), py::arg("timeout"),
           py::arg("layout_hash"), py::arg("bind_host"), py::arg("groups"), py::arg("params"), py::arg("count"))
      .def_property_readonly("port", &Server::port)
      .def_property_readonly("state_buffers", &Server::stateBuffers)
      .def("next_control", [](Server& s, double seconds) {
             bool finished = false;
             ControlRequest r;
             {
               py::gil_scoped_release nogil;
               r = s.nextControl(seconds, &finished);
             }
             py::object req = py::none();
             if (r.id) req = py::make_tuple(r.id, r.kind == kSave ? "save" : "load", r.step, r.path, r.worker);
             return py::make_tuple(req, finished);
           }, py::arg("seconds"),
           "Waits up to `seconds`; returns ((id, 'save'|'load', step, path, worker) or None, finished).")
      .def("complete_control", &Server::completeControl, py::arg("id"), py::arg("ok"), py::arg("message"))
      .def("snapshot", [](Server& s, Ptr params, Ptr s1, Ptr s2) {
             std::vector<GroupSlice> g;
             {
               py::gil_scoped_release nogil;
               g = s.snapshot(P<float>(params), P<float>(s1), P<float>(s2));
             }
             py::list out;
             for (const auto& x : g) out.append(progressOf(x));
             return out;
           }, py::arg("params"), py::arg("state1"), py::arg("state2"),
           "Copies the shard and its optimizer state (0 for a state this optimizer lacks); returns group progress.")
      .def("restore", [](Server& s, Ptr params, Ptr s1, Ptr s2, const std::vector<py::dict>& groups) {
             std::vector<GroupSlice> g;
             for (const auto& d : groups) g.push_back(sliceFrom(d));
             py::gil_scoped_release nogil;
             s.restore(P<float>(params), P<float>(s1), P<float>(s2), g);
           }, py::arg("params"), py::arg("state1"), py::arg("state2"), py::arg("groups"))
      .def("stats_json", &Server::statsJson, Release())
      .def("stop", &Server::stop, Release());

  py::class_<Exchange>(m, "Exchange", "What one push/pull brought back")
      .def_readonly("step", &Exchange::step)
      .def_readonly("lead", &Exchange::lead)
      .def_readonly("slowest", &Exchange::slowest)
      .def_readonly("applied", &Exchange::applied)
      .def_readonly("seconds", &Exchange::seconds);

  py::class_<Client>(m, "Client", "A worker's connections to every parameter server")
      .def(py::init([](const std::string& token, int worker, int rank, std::vector<std::string> hosts,
                       std::vector<int> ports, std::vector<int> serverRanks, std::vector<uint64_t> bounds,
                       uint64_t layoutHash, int numGroups, double timeout) {
             ClientOptions o;
             o.token = token; o.worker = worker; o.rank = rank; o.hosts = std::move(hosts);
             o.ports = std::move(ports); o.serverRanks = std::move(serverRanks); o.bounds = std::move(bounds);
             o.layoutHash = layoutHash; o.numGroups = numGroups; o.timeout = timeout;
             py::gil_scoped_release nogil;
             return std::make_unique<Client>(o);
           }),
           py::arg("token"), py::arg("worker"), py::arg("rank"), py::arg("hosts"), py::arg("ports"),
           py::arg("server_ranks"), py::arg("bounds"), py::arg("layout_hash"), py::arg("num_groups"),
           py::arg("timeout"))
      .def_property_readonly("step", &Client::step)
      .def_property_readonly("busy", &Client::busy)
      .def("start", [](Client& c, Ptr grad, Ptr params, const std::vector<double>& lrs, DType wire) {
             c.start(P<const float>(grad), P<float>(params), lrs, wire);
           }, py::arg("grad"), py::arg("params"), py::arg("lrs"), py::arg("wire"), Release())
      .def("wait", &Client::wait, Release())
      .def("pull", [](Client& c, Ptr params) { c.pull(P<float>(params)); }, py::arg("params"), Release())
      .def("control", &Client::control, py::arg("kind"), py::arg("step"), py::arg("path"), Release())
      .def("stats", &Client::stats, Release())
      .def("done", &Client::done, Release());

  m.attr("SAVE") = static_cast<uint32_t>(kSave);
  m.attr("LOAD") = static_cast<uint32_t>(kLoad);
  m.attr("PROTOCOL_VERSION") = kVersion;
  m.def("connect_raw", [](const std::string& host, int port, const std::string& token, double timeout) {
          const Deadline d = deadlineIn(timeout);
          Socket s = Socket::connect(host, port, d, "a parameter server");
          authenticateAsClient(s, token, "ps", d);
          return s.release();
        }, py::arg("host"), py::arg("port"), py::arg("token"), py::arg("timeout") = 10.0, Release(),
        "An authenticated connection to a parameter server as a raw file descriptor, for tests that "
        "send hand-made (malformed) messages. The caller owns the descriptor.");
}

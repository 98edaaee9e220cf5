// dtrain._C.data: TFRecord reading, writing, indexing and Example parsing.
// Blocking calls release the GIL. Batch columns reach Python through the buffer
// protocol (torch.frombuffer), without a copy; the buffer keeps its batch alive.
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>

#include "common/error.h"
#include "data/crc32c.h"
#include "data/example.h"
#include "data/pipeline.h"
#include "data/record_reader.h"

namespace py = pybind11;
using namespace dtrain;
using namespace dtrain::data;

namespace {

using Release = py::call_guard<py::gil_scoped_release>;

FType parseFType(const std::string& s) {
  if (s == "float32") return FType::kFloat32;
  if (s == "int64") return FType::kInt64;
  if (s == "uint8") return FType::kUInt8;
  if (s == "bytes") return FType::kBytes;
  DTRAIN_THROW(kConfig, "feature dtype '", s, "' is not one of float32, int64, uint8, bytes");
}

// Memory of one batch column, exported through the buffer protocol.
struct View {
  std::shared_ptr<Batch> owner;
  uint8_t* ptr;
  size_t size;
};

View view(const std::shared_ptr<Batch>& b, Buffer& v) { return View{b, v.data(), v.size()}; }

}  // namespace

void bindData(py::module_& m) {
  m.doc() = "TFRecord framing, CRC-32C, zlib/gzip, Example parsing into column buffers";

  m.def("crc32c", [](py::buffer b, uint32_t crc) {
          py::buffer_info info = b.request();
          size_t n = info.size * info.itemsize;
          const void* p = info.ptr;
          py::gil_scoped_release nogil;
          return crc32c(p, n, crc);
        }, py::arg("data"), py::arg("crc") = 0, "CRC-32C of a bytes-like object (continuing from `crc`).");
  m.def("mask_crc", &maskCrc);
  m.def("crc32c_impl", [] { return std::string(crc32cImpl()); });
  m.def("set_crc32c_hardware", &setCrc32cHardware, py::arg("on"));

  py::class_<View>(m, "View", py::buffer_protocol())
      .def_buffer([](View& v) {
        return py::buffer_info(v.ptr, 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(v.size)}, {1});
      })
      .def("__len__", [](View& v) { return v.size; });

  py::class_<Schema, std::shared_ptr<Schema>>(m, "Schema")
      .def(py::init([](py::list features, bool sequence) {
             auto s = std::make_shared<Schema>();
             s->sequenceContext = sequence;
             for (py::handle h : features) {
               // (name, varlen, dtype, shape, default bytes or None, default value lengths)
               auto t = h.cast<py::tuple>();
               FeatureSpec f;
               f.name = t[0].cast<std::string>();
               f.varlen = t[1].cast<bool>();
               f.dtype = parseFType(t[2].cast<std::string>());
               f.shape = t[3].cast<std::vector<int64_t>>();
               f.numel = 1;
               for (int64_t d : f.shape) f.numel *= d;
               if (!t[4].is_none()) {
                 std::string d = t[4].cast<std::string>();
                 f.hasDefault = true;
                 f.defaults.assign(d.begin(), d.end());
                 f.defaultLens = t[5].cast<std::vector<uint64_t>>();
               }
               s->features.push_back(std::move(f));
             }
             return s;
           }),
           py::arg("features"), py::arg("sequence") = false);

  py::class_<Batch, std::shared_ptr<Batch>>(m, "Batch")
      .def_property_readonly("rows", &Batch::rows)
      .def("data", [](std::shared_ptr<Batch> b, size_t i) { return view(b, b->column(i).data); })
      .def("padded", [](std::shared_ptr<Batch> b, size_t i) { return view(b, b->column(i).padded); })
      .def("max_len", [](Batch& b, size_t i) { return b.column(i).maxLen; })
      .def("lengths", [](Batch& b, size_t i) { return b.column(i).lengths; })
      .def("bytes_values", [](Batch& b, size_t i) {
             // A "bytes" column as a list per row (FixedLen: numel values a row; VarLen: lengths[r]).
             const FeatureSpec& s = b.schema().features[i];
             Column& c = b.column(i);
             py::list rows;
             size_t v = 0, off = 0;
             for (size_t r = 0; r < b.rows(); ++r) {
               size_t n = s.varlen ? static_cast<size_t>(c.lengths[r]) : static_cast<size_t>(s.numel);
               py::list row;
               for (size_t k = 0; k < n; ++k, ++v) {
                 row.append(py::bytes(reinterpret_cast<const char*>(c.data.data()) + off, c.valueLens[v]));
                 off += c.valueLens[v];
               }
               rows.append(row);
             }
             return rows;
           })
      .def_readonly("offsets", &Batch::offsets)
      .def_readonly("files", &Batch::files);

  m.def("parse_examples", [](std::shared_ptr<Schema> schema, std::vector<std::string> records) {
          auto b = std::make_shared<Batch>(schema, std::max<size_t>(records.size(), 1));
          {
            py::gil_scoped_release nogil;
            for (size_t i = 0; i < records.size(); ++i) {
              try {
                b->add(reinterpret_cast<const uint8_t*>(records[i].data()), records[i].size());
              } catch (const ParseError& e) {
                DTRAIN_THROW(kData, "record ", i, (e.feature.empty() ? "" : ", feature '" + e.feature + "'"),
                             ": ", e.what());
              }
            }
            b->finish();
          }
          return b;
        }, py::arg("schema"), py::arg("records"), "Parses serialized Examples into one batch (DataError on a bad one).");

  m.def("inspect_example", [](py::bytes rec) {
          std::string s = rec;
          try {
            auto found = inspectExample(reinterpret_cast<const uint8_t*>(s.data()), s.size(), false);
            py::list out;
            for (auto& f : found) out.append(py::make_tuple(f.name, f.kind, f.count, f.bytes));
            return out;
          } catch (const ParseError& e) {
            DTRAIN_THROW(kData, "not a valid Example: ", e.what());
          }
        }, "[(name, kind 0 none/1 bytes/2 float/3 int64, value count, bytes)] of one serialized Example.");

  m.def("encode_example", [](py::list features) {
          // [(name, kind, buffer, count, lens or None)]
          std::vector<EncodeFeature> fs;
          std::vector<py::buffer_info> keep;
          std::vector<std::vector<uint64_t>> lens;
          keep.reserve(features.size());
          lens.reserve(features.size());
          for (py::handle h : features) {
            auto t = h.cast<py::tuple>();
            EncodeFeature f;
            f.name = t[0].cast<std::string>();
            f.kind = t[1].cast<int>();
            keep.push_back(t[2].cast<py::buffer>().request());
            f.data = static_cast<const uint8_t*>(keep.back().ptr);
            f.count = t[3].cast<size_t>();
            lens.push_back(t[4].is_none() ? std::vector<uint64_t>{} : t[4].cast<std::vector<uint64_t>>());
            f.lens = lens.back().data();
            fs.push_back(f);
          }
          std::string out;
          encodeExample(fs, out);
          return py::bytes(out);
        });

  py::class_<RecordReader>(m, "RecordReader")
      .def(py::init([](const std::string& path, const std::string& comp, bool skip, bool verify, size_t buf) {
             return std::make_unique<RecordReader>(path, parseCompression(comp), skip ? OnError::kSkip : OnError::kRaise,
                                                   verify, buf);
           }),
           py::arg("path"), py::arg("compression") = "", py::arg("skip") = false, py::arg("verify") = true,
           py::arg("buffer_bytes") = size_t(1) << 20, Release())
      .def("next", [](RecordReader& r) -> py::object {
             Record rec;
             bool ok;
             {
               py::gil_scoped_release nogil;
               ok = r.next(rec);
             }
             if (!ok) return py::none();
             return py::make_tuple(py::bytes(reinterpret_cast<const char*>(rec.data), rec.size), rec.offset);
           }, "(record bytes, offset) or None at the end.")
      .def("seek", &RecordReader::seek, Release())
      .def("problems", &RecordReader::problems)
      .def("stats", [](RecordReader& r) {
             const ReaderStats& s = r.stats();
             py::dict d;
             d["records"] = s.records;
             d["bytes"] = s.bytes;
             d["bad_records"] = s.badRecords;
             d["skipped_bytes"] = s.skippedBytes;
             return d;
           });

  py::class_<RecordWriter>(m, "RecordWriter")
      .def(py::init([](const std::string& path, const std::string& comp, int level) {
             return std::make_unique<RecordWriter>(path, parseCompression(comp), level);
           }),
           py::arg("path"), py::arg("compression") = "", py::arg("level") = -1)
      .def("write", [](RecordWriter& w, py::buffer b) {
             py::buffer_info info = b.request();
             w.write(static_cast<const uint8_t*>(info.ptr), info.size * info.itemsize);
           })
      .def("flush", &RecordWriter::flush, Release())
      .def("close", &RecordWriter::close, Release())
      .def_property_readonly("records", &RecordWriter::records)
      .def_property_readonly("offset", &RecordWriter::offset);

  py::class_<Pipeline>(m, "Pipeline")
      .def(py::init([](std::vector<std::string> files, const std::string& comp, std::shared_ptr<Schema> schema,
                       std::vector<std::tuple<int32_t, uint64_t, uint64_t, int64_t>> ranges, py::object refs,
                       size_t refsPerSegment, size_t batch, bool drop, bool skip, bool verify, size_t buf,
                       size_t cycle, size_t block, size_t shuffle, uint64_t seed, size_t workers, size_t prefetch,
                       uint64_t skipRecords, size_t chunkBytes, size_t readAhead) {
             PipelineOptions o;
             o.files = std::move(files);
             o.compression = parseCompression(comp);
             o.schema = std::move(schema);
             o.batchSize = batch;
             o.dropRemainder = drop;
             o.onError = skip ? OnError::kSkip : OnError::kRaise;
             o.verify = verify;
             o.bufferBytes = buf;
             o.cycle = cycle;
             o.block = block;
             o.shuffleBuffer = shuffle;
             o.seed = seed;
             o.workers = workers;
             o.prefetch = prefetch;
             o.skipRecords = skipRecords;
             o.chunkBytes = chunkBytes;
             o.readAheadBytes = readAhead;
             std::vector<Segment> segs;
             for (const auto& [file, start, skipN, take] : ranges) {
               Segment s;
               s.file = file;
               s.start = start;
               s.skip = skipN;
               s.take = take < 0 ? UINT64_MAX : static_cast<uint64_t>(take);
               segs.push_back(std::move(s));
             }
             if (!refs.is_none()) {  // (file, offset, frame length) arrays, cut into segments
               using Arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
               auto t = refs.cast<py::tuple>();
               Arr f = t[0].cast<Arr>(), off = t[1].cast<Arr>(), len = t[2].cast<Arr>();
               DTRAIN_CHECK(f.size() == off.size() && f.size() == len.size(), kConfig,
                            "record refs need equal-length file, offset and length arrays");
               DTRAIN_CHECK(refsPerSegment > 0, kConfig, "refs_per_segment must be at least 1");
               const int64_t *pf = f.data(), *po = off.data(), *pl = len.data();
               for (py::ssize_t i = 0; i < f.size(); i += refsPerSegment) {
                 Segment s;
                 s.file = static_cast<int32_t>(pf[i]);
                 for (py::ssize_t j = i; j < std::min<py::ssize_t>(f.size(), i + refsPerSegment); ++j)
                   s.refs.push_back(RecordRef{static_cast<int32_t>(pf[j]), static_cast<uint64_t>(po[j]),
                                              static_cast<uint64_t>(pl[j])});
                 segs.push_back(std::move(s));
               }
             }
             return std::make_unique<Pipeline>(std::move(o), std::move(segs));
           }),
           py::arg("files"), py::arg("compression"), py::arg("schema"), py::arg("ranges"), py::arg("refs") = py::none(),
           py::arg("refs_per_segment") = 256, py::arg("batch_size") = 256, py::arg("drop_remainder") = false,
           py::arg("skip") = false, py::arg("verify") = true, py::arg("buffer_bytes") = size_t(1) << 20,
           py::arg("cycle") = 1, py::arg("block") = 1, py::arg("shuffle_buffer") = 0, py::arg("seed") = 0,
           py::arg("workers") = 2, py::arg("prefetch") = 2, py::arg("skip_records") = 0,
           py::arg("chunk_bytes") = size_t(1) << 20, py::arg("read_ahead_bytes") = size_t(32) << 20)
      .def("next", [](Pipeline& p) -> py::object {
             std::shared_ptr<Batch> batch;
             std::shared_ptr<RawBatch> raw;
             bool more;
             {
               py::gil_scoped_release nogil;
               more = p.next(batch, raw);
             }
             if (!more) return py::none();
             if (batch) return py::cast(batch);
             py::list out;
             for (size_t i = 0; i < raw->rows(); ++i)
               out.append(py::bytes(reinterpret_cast<const char*>(raw->data[i]), raw->size[i]));
             return out;
           }, "The next batch (a Batch, or a list of bytes without a schema), or None at the end.")
      .def("close", &Pipeline::close, Release())
      .def_property_readonly("threads", &Pipeline::threads)
      .def("problems", &Pipeline::problems)
      .def("stats", [](Pipeline& p) {
             const PipelineStats s = p.stats();
             py::dict d;
             d["records"] = s.records;
             d["bytes"] = s.bytes;
             d["bad_records"] = s.badRecords;
             d["bad_examples"] = s.badExamples;
             d["batches"] = s.batches;
             d["resumed"] = s.resumed;
             d["dropped"] = s.dropped;
             d["wait_s"] = s.waitNs * 1e-9;
             d["read_s"] = s.readNs * 1e-9;
             d["parse_s"] = s.parseNs * 1e-9;
             return d;
           });

  m.def("count_records", [](const std::string& path, const std::string& comp, bool skip) {
          Compression c = parseCompression(comp);
          py::gil_scoped_release nogil;
          return countRecords(path, c, skip ? OnError::kSkip : OnError::kRaise);
        }, py::arg("path"), py::arg("compression") = "", py::arg("skip") = false,
        "Records a reader would return from the file (both CRCs checked).");

  m.def("index_file", [](const std::string& path, const std::string& comp) {
          Compression c = parseCompression(comp);
          py::gil_scoped_release nogil;
          return indexFile(path, c);
        }, py::arg("path"), py::arg("compression") = "",
        "[(offset, frame length)] of every record, both CRCs checked (DataError at the first bad one).");
}

// tf.train.Example at the wire level, straight into column buffers.
//
//   Example  { Features features = 1; }
//   Features { map<string, Feature> feature = 1; }     (entries: key = 1, value = 2)
//   Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
//   *List    { repeated <T> value = 1; }               (floats and int64s packed or not)
//
// SequenceExample { Features context = 1; FeatureLists feature_lists = 2; }: its
// context parses like an Example's features.
//
// Unknown fields are skipped, map entries may put the value before the key, and a
// key seen twice takes its last value, as protobuf's own parser does.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "data/buffer.h"

namespace dtrain {
namespace data {

enum class FType : uint8_t { kFloat32, kInt64, kUInt8, kBytes };
const char* ftypeName(FType t);
size_t ftypeSize(FType t);  // bytes per element in a column (kBytes: 0, kept as offsets)

struct FeatureSpec {
  std::string name;
  bool varlen = false;
  FType dtype = FType::kFloat32;
  std::vector<int64_t> shape;     // FixedLen only
  int64_t numel = 1;              // FixedLen: product of shape
  bool hasDefault = false;
  std::vector<uint8_t> defaults;  // FixedLen numeric/uint8: numel elements; kBytes: one value per element,
  std::vector<uint64_t> defaultLens;  //   lengths here, bytes concatenated in `defaults`
};

struct Schema {
  std::vector<FeatureSpec> features;
  bool sequenceContext = false;  // records are SequenceExamples; read their context features
};

// A record's problem: which feature (empty: the framing of the message) and what.
struct ParseError : std::runtime_error {
  ParseError(std::string feature, const std::string& what) : std::runtime_error(what), feature(std::move(feature)) {}
  std::string feature;
};

// One feature's values over the rows of a batch.
struct Column {
  Buffer data;       // fixed: rows*numel elements; varlen: all values, row after row
  std::vector<int64_t> lengths;    // varlen: values per row
  std::vector<uint64_t> valueLens; // kBytes: the byte length of every value, in order
  // After finish(): varlen numeric/uint8 rows padded to the longest, zeros after each row's end.
  Buffer padded;
  int64_t maxLen = 0;
};

class Batch {
 public:
  Batch(std::shared_ptr<const Schema> schema, size_t capacity);
  // Parses one serialized Example into the next row. Throws ParseError (the row is then
  // left out, as if never added).
  void add(const uint8_t* p, size_t n);
  // Pads the varlen columns; call once, after the last add().
  void finish();
  // Empties the batch for reuse, keeping its memory.
  void reset();
  size_t rows() const { return rows_; }
  const Schema& schema() const { return *schema_; }
  Column& column(size_t i) { return cols_[i]; }
  // Offsets of the records' Example messages, for messages (set by the caller).
  std::vector<uint64_t> offsets;
  std::vector<int32_t> files;

 private:
  std::shared_ptr<const Schema> schema_;
  std::vector<Column> cols_;
  size_t rows_ = 0;
  size_t capacity_;
  // Scratch: where each spec feature's Feature message lies in the current record.
  std::vector<const uint8_t*> at_;
  std::vector<size_t> len_;
  std::vector<uint8_t> seen_;
};

// What a record's Example holds, for `dtrain-data stats`: name -> kind and value count.
struct FoundFeature {
  std::string name;
  int kind;  // 0 none (empty Feature), 1 bytes, 2 float, 3 int64
  uint64_t count;
  uint64_t bytes;  // kind 1: total bytes
};
std::vector<FoundFeature> inspectExample(const uint8_t* p, size_t n, bool sequence);

// Encodes one Example from (name, kind, values) triples; used by the writer's fast path and tests.
// kind 1: `data` holds the bytes values back to back with `lens`; 2: float32s; 3: int64s.
struct EncodeFeature {
  std::string name;
  int kind;
  const uint8_t* data;
  size_t count;                 // values (kind 2/3) or number of bytes values (kind 1)
  const uint64_t* lens = nullptr;
};
void encodeExample(const std::vector<EncodeFeature>& features, std::string& out);

}  // namespace data
}  // namespace dtrain

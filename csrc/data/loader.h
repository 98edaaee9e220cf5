// Batches of parsed Examples from a list of TFRecord files, read in order.
// Everything here runs without the GIL (the binding releases it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "data/example.h"
#include "data/record_reader.h"

namespace dtrain {
namespace data {

struct LoaderStats {
  uint64_t records = 0;     // records parsed into batches
  uint64_t bytes = 0;       // their payload bytes
  uint64_t badRecords = 0;  // framing errors skipped
  uint64_t badExamples = 0; // parse errors skipped
  uint64_t batches = 0;
};

class Loader {
 public:
  // `ranges`: per file, the records to take as [first, end) record numbers, or empty for all.
  Loader(std::vector<std::string> files, Compression c, std::shared_ptr<const Schema> schema, size_t batchSize,
         bool dropRemainder, OnError onError, bool verify, size_t bufferBytes);

  // The next batch, or null when the files are exhausted.
  std::shared_ptr<Batch> next();
  // Raw mode (no schema): up to n records' bytes.
  std::vector<std::string> nextRaw(size_t n);

  const LoaderStats& stats() const { return stats_; }
  std::vector<std::string> problems() const { return problems_; }

 private:
  bool nextRecord(Record& r);
  void note(const std::string& msg);

  std::vector<std::string> files_;
  Compression c_;
  std::shared_ptr<const Schema> schema_;
  size_t batchSize_;
  bool dropRemainder_;
  OnError onError_;
  bool verify_;
  size_t bufferBytes_;
  size_t file_ = 0;
  std::unique_ptr<RecordReader> reader_;
  LoaderStats stats_;
  std::vector<std::string> problems_;
};

// "offset length" of every record frame in a file, checking both CRCs; throws DataError
// at the first bad record.
std::vector<std::pair<uint64_t, uint64_t>> indexFile(const std::string& path, Compression c);

}  // namespace data
}  // namespace dtrain

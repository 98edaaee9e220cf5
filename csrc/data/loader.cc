#include "data/loader.h"

#include "common/error.h"

namespace dtrain {
namespace data {

Loader::Loader(std::vector<std::string> files, Compression c, std::shared_ptr<const Schema> schema,
               size_t batchSize, bool dropRemainder, OnError onError, bool verify, size_t bufferBytes)
    : files_(std::move(files)), c_(c), schema_(std::move(schema)), batchSize_(batchSize),
      dropRemainder_(dropRemainder), onError_(onError), verify_(verify), bufferBytes_(bufferBytes) {
  DTRAIN_CHECK(batchSize_ > 0, kConfig, "batch size must be at least 1, got ", batchSize_);
}

void Loader::note(const std::string& msg) {
  if (problems_.size() < 100) problems_.push_back(msg);
}

bool Loader::nextRecord(Record& r) {
  for (;;) {
    if (!reader_) {
      if (file_ >= files_.size()) return false;
      reader_ = std::make_unique<RecordReader>(files_[file_], c_, onError_, verify_, bufferBytes_);
    }
    if (reader_->next(r)) return true;
    const ReaderStats& rs = reader_->stats();
    stats_.badRecords += rs.badRecords;
    for (const auto& p : reader_->problems()) note(p);
    reader_.reset();
    ++file_;
  }
}

std::shared_ptr<Batch> Loader::next() {
  DTRAIN_CHECK(schema_ != nullptr, kConfig, "this loader has no schema: read raw records with next_raw()");
  auto batch = std::make_shared<Batch>(schema_, batchSize_);
  Record r;
  while (batch->rows() < batchSize_ && nextRecord(r)) {
    try {
      batch->add(r.data, r.size);
    } catch (const ParseError& e) {
      std::string msg = files_[file_] + ": record at byte offset " + std::to_string(r.offset) +
                        (e.feature.empty() ? "" : ", feature '" + e.feature + "'") + ": " + e.what();
      if (onError_ == OnError::kRaise)
        DTRAIN_THROW(kData, msg, "; fix the spec or the data, or pass on_error='skip' to leave such records out");
      ++stats_.badExamples;
      note(msg);
      continue;
    }
    batch->offsets.push_back(r.offset);
    batch->files.push_back(static_cast<int32_t>(file_));
    ++stats_.records;
    stats_.bytes += r.size;
  }
  if (batch->rows() == 0 || (dropRemainder_ && batch->rows() < batchSize_)) return nullptr;
  batch->finish();
  ++stats_.batches;
  return batch;
}

std::vector<std::string> Loader::nextRaw(size_t n) {
  std::vector<std::string> out;
  Record r;
  while (out.size() < n && nextRecord(r)) {
    out.emplace_back(reinterpret_cast<const char*>(r.data), r.size);
    ++stats_.records;
    stats_.bytes += r.size;
  }
  return out;
}

std::vector<std::pair<uint64_t, uint64_t>> indexFile(const std::string& path, Compression c) {
  RecordReader reader(path, c, OnError::kRaise, true);
  std::vector<std::pair<uint64_t, uint64_t>> out;
  Record r;
  while (reader.next(r)) out.emplace_back(r.offset, r.size + 16);
  return out;
}

}  // namespace data
}  // namespace dtrain

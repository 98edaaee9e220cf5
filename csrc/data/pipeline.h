// The threaded input pipeline: TFRecord segments -> deterministic interleave ->
// optional shuffle buffer -> batches parsed in parallel -> an ordered output queue.
//
//   workers (N threads)            assembler (1 thread)               consumer (next())
//   read chunks of segments  --->  merge the active segments    --->  batch k, in order
//   parse raw batches              round-robin, shuffle, cut
//                                  raw batches, number them
//
// Everything runs without the GIL. The order of records and batches depends only on
// the plan and the seed, never on thread timing or the number of workers: the
// assembler alone decides the order, workers only fill segment queues and parse
// numbered batches, and the consumer takes batches by number. Memory is bounded:
// each segment queue holds at most two chunks, only the active segments plus
// `workers` segments ahead are read, and at most `prefetch + workers` batches exist
// between the assembler and the consumer.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/example.h"
#include "data/record_reader.h"

namespace dtrain {
namespace data {

// One record's frame for random access: `frameLen` = 12 + data length + 4 bytes at `offset`.
struct RecordRef {
  int32_t file = 0;
  uint64_t offset = 0;
  uint64_t frameLen = 0;
};

// A run of records read in order. Either a range of one file (seek to `start` when it
// is not 0, which needs a plain file; pass over `skip` records; read at most `take`),
// or, when `refs` is not empty, exactly those records (plain files, random access).
struct Segment {
  int32_t file = 0;
  uint64_t start = 0;
  uint64_t skip = 0;
  uint64_t take = UINT64_MAX;
  std::vector<RecordRef> refs;
};

struct PipelineOptions {
  std::vector<std::string> files;
  Compression compression = Compression::kNone;
  std::shared_ptr<const Schema> schema;  // null: raw records
  size_t batchSize = 256;
  bool dropRemainder = false;
  OnError onError = OnError::kRaise;
  bool verify = true;
  size_t bufferBytes = 1 << 20;  // each open file's read buffer
  size_t cycle = 1;              // segments interleaved at once
  size_t block = 1;              // records taken from a segment per turn
  size_t shuffleBuffer = 0;      // records; 0: no shuffle buffer
  uint64_t seed = 0;
  size_t workers = 2;
  size_t prefetch = 2;           // parsed batches kept ready ahead of the consumer
  uint64_t skipRecords = 0;      // records of the final order passed over first (resuming)
  size_t chunkBytes = 1 << 20;   // records read per worker task
  size_t readAheadBytes = 32 << 20;  // records read but not yet batched, over all segments
};

struct PipelineStats {
  uint64_t records = 0;      // records delivered in batches
  uint64_t bytes = 0;        // their payload bytes
  uint64_t badRecords = 0;   // framing or CRC errors skipped
  uint64_t badExamples = 0;  // parse errors skipped
  uint64_t batches = 0;      // batches delivered
  uint64_t resumed = 0;      // records passed over by skipRecords
  uint64_t dropped = 0;      // records of a short last batch left out (drop_remainder)
  uint64_t waitNs = 0;       // time next() waited for a batch
  uint64_t readNs = 0;       // worker time reading and checking records
  uint64_t parseNs = 0;      // worker time parsing
};

// Records read by one worker task, without copying them: they lie in the file reader's
// buffers (sequential reads), which the chunk holds, or in `arena` (random access).
struct Chunk {
  Buffer arena;
  std::vector<std::shared_ptr<const Buffer>> bufs;
  std::vector<const uint8_t*> data;
  std::vector<uint64_t> size, offset;
  std::vector<int32_t> file;
  uint64_t bytes = 0;        // payload bytes
  std::exception_ptr error;  // set: the segment failed after these records
  size_t rows() const { return data.size(); }
};

// A batch of raw records (pointers into chunks it holds, or into copies it owns).
struct RawBatch {
  std::vector<const uint8_t*> data;
  std::vector<uint64_t> size, offset;
  std::vector<int32_t> file;
  std::vector<std::shared_ptr<const Chunk>> hold;
  std::vector<std::unique_ptr<uint8_t[]>> own;
  size_t rows() const { return data.size(); }
};

class Pipeline {
 public:
  Pipeline(PipelineOptions options, std::vector<Segment> segments);
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // The next batch in order: `batch` with a schema, `raw` without. Returns false at the
  // end. Throws the first error in stream order (DataError naming file and offset).
  bool next(std::shared_ptr<Batch>& batch, std::shared_ptr<RawBatch>& raw);
  // Stops the threads; next() then returns false. Also done by the destructor.
  void close();

  PipelineStats stats() const;
  std::vector<std::string> problems() const;
  size_t threads() const { return threads_.size(); }

 private:
  struct SegState;
  struct Owned;
  struct Output {
    std::shared_ptr<Batch> batch;
    std::shared_ptr<RawBatch> raw;
    std::exception_ptr error;
  };
  enum class Pull { kRecord, kEnd, kError, kStop };

  void workerLoop();
  void assemblerLoop();
  void assemble();
  int pickSegment();  // a segment a worker may read now, or -1 (lock held)
  std::shared_ptr<Chunk> readChunk(int s, bool& finished);
  void readRange(int s, Chunk& c, bool& finished);
  void readRefs(int s, Chunk& c, bool& finished);
  void parse(uint64_t seq, std::shared_ptr<RawBatch> raw);
  Pull pull(size_t slot, const uint8_t*& data, uint64_t& size, uint64_t& offset, int32_t& file,
            std::shared_ptr<const Chunk>& chunk, std::exception_ptr& error);
  void deliver(const uint8_t* data, uint64_t size, uint64_t offset, int32_t file, const std::shared_ptr<const Chunk>& chunk,
               std::unique_ptr<uint8_t[]> owned);
  bool submit();  // the current raw batch as the next number; false when stopping
  void note(const std::string& msg);  // lock held
  int fd(int32_t file);
  uint64_t rand();

  template <class T>
  struct Recycler;

  PipelineOptions o_;
  std::shared_ptr<Recycler<Buffer>> buffers_;  // reader buffers, reused
  std::shared_ptr<Recycler<Batch>> batches_;   // parsed batches, reused once Python lets go
  std::vector<Segment> segs_;
  std::vector<std::unique_ptr<SegState>> st_;

  mutable std::mutex mu_;
  std::condition_variable cvWork_, cvAsm_, cvOut_;
  bool stop_ = false;
  // Who sleeps on which condition: a notify is sent only when someone waits for it.
  int idle_ = 0;
  bool asmWaiting_ = false, outWaiting_ = false;

  // Assembler state (slots_ and nextSeg_ are read by workers under mu_).
  std::vector<int> slots_;
  size_t nextSeg_ = 0;
  int wanted_ = -1;
  uint64_t queued_ = 0;  // bytes in segment queues
  std::vector<std::shared_ptr<const Chunk>> cur_;
  std::vector<size_t> pos_;
  std::vector<Owned> shuffle_;
  uint64_t rng_[2];
  uint64_t skipLeft_;
  std::shared_ptr<RawBatch> open_;

  // Numbered batches between the assembler and the consumer.
  std::deque<std::pair<uint64_t, std::shared_ptr<RawBatch>>> parseQueue_;
  std::map<uint64_t, Output> results_;
  uint64_t nextSeq_ = 0, nextOut_ = 0, totalSeq_ = UINT64_MAX;
  bool failed_ = false;

  std::mutex fdMu_;
  std::vector<int> fds_;

  PipelineStats stats_;
  std::vector<std::string> problems_;
  std::vector<std::thread> threads_;
};

// Records in a file (counting what a reader with these settings would return).
uint64_t countRecords(const std::string& path, Compression c, OnError onError);

// "offset length" of every record frame in a file, checking both CRCs; throws DataError
// at the first bad record.
std::vector<std::pair<uint64_t, uint64_t>> indexFile(const std::string& path, Compression c);

}  // namespace data
}  // namespace dtrain

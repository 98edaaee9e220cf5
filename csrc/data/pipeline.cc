#include "data/pipeline.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "common/error.h"
#include "data/crc32c.h"

namespace dtrain {
namespace data {

namespace {

constexpr size_t kQueueChunks = 2;       // chunks a segment may hold ready
constexpr size_t kChunkRecords = 8192;   // records per chunk at most

uint64_t nowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

uint64_t splitmix(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace

// Objects handed out as shared_ptrs that come back here when their last user lets go
// (also from another thread, or after the pipeline is gone), so big buffers are
// reused instead of being unmapped and faulted in again for every batch.
template <class T>
struct Pipeline::Recycler {
  explicit Recycler(size_t keep) : keep(keep) {}
  std::mutex mu;
  std::vector<std::unique_ptr<T>> free;
  size_t keep;

  template <class Make, class Fits>
  static std::shared_ptr<T> get(const std::shared_ptr<Recycler>& r, Make make, Fits fits) {
    std::unique_ptr<T> obj;
    {
      std::lock_guard<std::mutex> lk(r->mu);
      if (!r->free.empty()) {
        obj = std::move(r->free.back());
        r->free.pop_back();
      }
    }
    if (!obj || !fits(*obj)) obj = make();
    std::weak_ptr<Recycler> home = r;
    return std::shared_ptr<T>(obj.release(), [home](T* p) {
      std::unique_ptr<T> own(p);
      if (auto r = home.lock()) {
        std::lock_guard<std::mutex> lk(r->mu);
        if (r->free.size() < r->keep) r->free.push_back(std::move(own));
      }
    });
  }
};

struct Pipeline::SegState {
  std::deque<std::shared_ptr<Chunk>> queue;
  bool busy = false;
  bool done = false;  // no more chunks will come
  std::unique_ptr<RecordReader> reader;
  uint64_t skipped = 0, taken = 0;
  size_t refPos = 0;
};

struct Pipeline::Owned {
  std::unique_ptr<uint8_t[]> data;
  uint64_t size, offset;
  int32_t file;
};

Pipeline::Pipeline(PipelineOptions options, std::vector<Segment> segments)
    : o_(std::move(options)), segs_(std::move(segments)) {
  DTRAIN_CHECK(o_.batchSize > 0, kConfig, "batch size must be at least 1, got ", o_.batchSize);
  DTRAIN_CHECK(o_.cycle > 0, kConfig, "interleave cycle must be at least 1, got ", o_.cycle);
  DTRAIN_CHECK(o_.block > 0, kConfig, "interleave block length must be at least 1, got ", o_.block);
  DTRAIN_CHECK(o_.workers > 0, kConfig, "the pipeline needs at least 1 worker thread, got ", o_.workers);
  DTRAIN_CHECK(o_.prefetch > 0, kConfig, "prefetch must be at least 1 batch, got ", o_.prefetch);
  for (const Segment& s : segs_) {
    DTRAIN_CHECK(s.file >= 0 && size_t(s.file) < o_.files.size(), kConfig, "segment names file ", s.file, " of ",
                 o_.files.size());
    for (const RecordRef& r : s.refs)
      DTRAIN_CHECK(r.file >= 0 && size_t(r.file) < o_.files.size(), kConfig, "record names file ", r.file, " of ",
                   o_.files.size());
    DTRAIN_CHECK(s.refs.empty() || o_.compression == Compression::kNone, kConfig,
                 "records of compressed files cannot be read out of order; shuffle with a buffer instead");
  }
  buffers_ = std::make_shared<Recycler<Buffer>>(o_.readAheadBytes / std::max<size_t>(o_.bufferBytes, 1) + 2 * o_.workers +
                                                 2 * o_.cycle + 8);
  batches_ = std::make_shared<Recycler<Batch>>(o_.prefetch + 2 * o_.workers + 4);
  st_.reserve(segs_.size());
  for (size_t i = 0; i < segs_.size(); ++i) st_.push_back(std::make_unique<SegState>());
  fds_.assign(o_.files.size(), -1);
  uint64_t s = o_.seed;
  rng_[0] = splitmix(s);
  rng_[1] = splitmix(s);
  skipLeft_ = o_.skipRecords;
  while (slots_.size() < o_.cycle && nextSeg_ < segs_.size()) slots_.push_back(static_cast<int>(nextSeg_++));
  cur_.resize(o_.cycle);
  pos_.assign(o_.cycle, 0);
  threads_.reserve(o_.workers + 1);
  for (size_t i = 0; i < o_.workers; ++i) threads_.emplace_back([this] { workerLoop(); });
  threads_.emplace_back([this] { assemblerLoop(); });
}

Pipeline::~Pipeline() {
  close();
  for (int f : fds_)
    if (f >= 0) ::close(f);
}

void Pipeline::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cvWork_.notify_all();
  cvAsm_.notify_all();
  cvOut_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

PipelineStats Pipeline::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

std::vector<std::string> Pipeline::problems() const {
  std::lock_guard<std::mutex> lk(mu_);
  return problems_;
}

void Pipeline::note(const std::string& msg) {
  if (problems_.size() < 100) problems_.push_back(msg);
}

uint64_t Pipeline::rand() {  // xorshift128+
  uint64_t a = rng_[0];
  const uint64_t b = rng_[1];
  rng_[0] = b;
  a ^= a << 23;
  rng_[1] = a ^ b ^ (a >> 17) ^ (b >> 26);
  return rng_[1] + b;
}

// ---------------------------------------------------------------- consumer

bool Pipeline::next(std::shared_ptr<Batch>& batch, std::shared_ptr<RawBatch>& raw) {
  batch.reset();
  raw.reset();
  std::unique_lock<std::mutex> lk(mu_);
  const uint64_t t0 = nowNs();
  outWaiting_ = true;
  cvOut_.wait(lk, [&] { return stop_ || failed_ || results_.count(nextOut_) || nextOut_ >= totalSeq_; });
  outWaiting_ = false;
  stats_.waitNs += nowNs() - t0;
  auto it = results_.find(nextOut_);
  if (stop_ || failed_ || it == results_.end()) return false;
  Output out = std::move(it->second);
  results_.erase(it);
  ++nextOut_;
  if (out.error) {
    failed_ = true;
    lk.unlock();
    cvAsm_.notify_all();
    std::rethrow_exception(out.error);
  }
  ++stats_.batches;
  if (asmWaiting_) cvAsm_.notify_one();
  lk.unlock();
  batch = std::move(out.batch);
  raw = std::move(out.raw);
  return true;
}

// ---------------------------------------------------------------- workers

int Pipeline::pickSegment() {
  auto readable = [&](int s) {
    const SegState& st = *st_[s];
    return !st.done && !st.busy && (st.queue.size() < kQueueChunks || queued_ + o_.chunkBytes <= o_.readAheadBytes);
  };
  if (wanted_ >= 0 && readable(wanted_)) return wanted_;
  for (int s : slots_)
    if (s >= 0 && readable(s)) return s;
  for (size_t s = nextSeg_; s < segs_.size() && s < nextSeg_ + o_.workers; ++s)
    if (readable(static_cast<int>(s))) return static_cast<int>(s);
  return -1;
}

void Pipeline::workerLoop() {
  std::unique_lock<std::mutex> lk(mu_);
  while (!stop_) {
    if (!parseQueue_.empty()) {
      auto job = std::move(parseQueue_.front());
      parseQueue_.pop_front();
      lk.unlock();
      parse(job.first, std::move(job.second));
      lk.lock();
      continue;
    }
    int s = pickSegment();
    if (s < 0) {
      ++idle_;
      cvWork_.wait(lk);
      --idle_;
      continue;
    }
    st_[s]->busy = true;
    lk.unlock();
    bool finished = false;
    const uint64_t t0 = nowNs();
    std::shared_ptr<Chunk> c = readChunk(s, finished);
    const uint64_t dt = nowNs() - t0;
    lk.lock();
    stats_.readNs += dt;
    SegState& st = *st_[s];
    st.busy = false;
    if (c->rows() || c->error) {
      queued_ += c->bytes;
      st.queue.push_back(std::move(c));
    }
    if (finished) {
      st.done = true;
      if (st.reader) {
        stats_.badRecords += st.reader->stats().badRecords;
        for (const auto& p : st.reader->problems()) note(p);
        st.reader.reset();
      }
    }
    if (asmWaiting_) cvAsm_.notify_one();
  }
}

std::shared_ptr<Chunk> Pipeline::readChunk(int s, bool& finished) {
  auto c = std::make_shared<Chunk>();
  try {
    if (segs_[s].refs.empty())
      readRange(s, *c, finished);
    else
      readRefs(s, *c, finished);
  } catch (...) {
    c->error = std::current_exception();
    finished = true;
  }
  return c;
}

void Pipeline::readRange(int s, Chunk& c, bool& finished) {
  const Segment& seg = segs_[s];
  SegState& st = *st_[s];
  if (!st.reader) {
    st.reader = std::make_unique<RecordReader>(o_.files[seg.file], o_.compression, o_.onError, o_.verify,
                                               o_.bufferBytes);
    if (seg.start) st.reader->seek(seg.start);
    st.reader->setBufferSource([pool = buffers_](size_t n) {
      return Recycler<Buffer>::get(pool, [n] { return std::make_unique<Buffer>(n); },
                                   [n](const Buffer& b) { return b.size() >= n; });
    });
  }
  Record r;
  const Buffer* last = nullptr;
  while (c.bytes < o_.chunkBytes && c.rows() < kChunkRecords) {
    if (st.taken >= seg.take || !st.reader->next(r)) {
      finished = true;
      return;
    }
    if (st.skipped < seg.skip) {
      ++st.skipped;
      continue;
    }
    ++st.taken;
    if (st.reader->buffer().get() != last) {  // hold the buffer: the reader then leaves it alone
      c.bufs.push_back(st.reader->buffer());
      last = c.bufs.back().get();
    }
    c.data.push_back(r.data);
    c.size.push_back(r.size);
    c.offset.push_back(r.offset);
    c.file.push_back(seg.file);
    c.bytes += r.size;
  }
}

int Pipeline::fd(int32_t file) {
  std::lock_guard<std::mutex> lk(fdMu_);
  if (fds_[file] < 0) {
    int f = ::open(o_.files[file].c_str(), O_RDONLY | O_CLOEXEC);
    DTRAIN_CHECK(f >= 0, kData, "cannot open '", o_.files[file], "': ", std::strerror(errno));
    fds_[file] = f;
  }
  return fds_[file];
}

void Pipeline::readRefs(int s, Chunk& c, bool& finished) {
  const Segment& seg = segs_[s];
  SegState& st = *st_[s];
  // Frames land back to back in the arena, sized once so record pointers stay valid.
  size_t end = st.refPos;
  uint64_t total = 0;
  while (end < seg.refs.size() && total < o_.chunkBytes && end - st.refPos < kChunkRecords)
    total += std::max<uint64_t>(seg.refs[end++].frameLen, 16);
  c.arena.resize(total);
  uint64_t at = 0;
  for (; st.refPos < end; ++st.refPos) {
    const RecordRef& ref = seg.refs[st.refPos];
    const std::string& path = o_.files[ref.file];
    auto bad = [&](const std::string& what) {
      std::string msg = path + ": bad record at byte offset " + std::to_string(ref.offset) + ": " + what;
      if (o_.onError == OnError::kRaise)
        DTRAIN_THROW(kData, msg, "; re-create the file or its index (`dtrain-data index`), or read with "
                     "on_error='skip' to pass over bad records");
      std::lock_guard<std::mutex> lk(mu_);
      ++stats_.badRecords;
      note(msg);
    };
    uint8_t* p = c.arena.data() + at;
    at += std::max<uint64_t>(ref.frameLen, 16);
    if (ref.frameLen < 16) {
      bad("the index gives a frame of " + std::to_string(ref.frameLen) + " bytes; a record takes at least 16");
      continue;
    }
    const uint64_t len = ref.frameLen - 16;
    uint64_t got = 0;
    const int f = fd(ref.file);
    while (got < ref.frameLen) {
      ssize_t k = ::pread(f, p + got, ref.frameLen - got, static_cast<off_t>(ref.offset + got));
      if (k < 0 && errno == EINTR) continue;
      DTRAIN_CHECK(k >= 0, kData, "reading '", path, "' at byte offset ", ref.offset + got, ": ",
                   std::strerror(errno));
      if (k == 0) break;
      got += static_cast<uint64_t>(k);
    }
    uint64_t hdrLen = 0;
    if (got >= 8) std::memcpy(&hdrLen, p, 8);
    std::string problem;
    if (got < ref.frameLen)
      problem = "the index gives a " + std::to_string(ref.frameLen) + "-byte record but the file ends after " +
                std::to_string(got) + " bytes (the index does not belong to this file: rebuild it)";
    else if (o_.verify && crc32c(p, 8) != unmaskCrc(load32(p + 8)))
      problem = "the length field's CRC does not match, so the length cannot be trusted";
    else if (hdrLen != len)
      problem = "the header says " + std::to_string(hdrLen) + " data bytes but the index says " +
                std::to_string(len) + " (the index is stale: rebuild it with `dtrain-data index`)";
    else if (o_.verify && crc32c(p + 12, len) != unmaskCrc(load32(p + 12 + len)))
      problem = "the data CRC does not match (" + std::to_string(len) + " data bytes): the payload is damaged";
    if (!problem.empty()) {
      bad(problem);
      continue;
    }
    c.data.push_back(p + 12);
    c.size.push_back(len);
    c.offset.push_back(ref.offset);
    c.file.push_back(ref.file);
    c.bytes += len;
  }
  if (st.refPos >= seg.refs.size()) finished = true;
}

void Pipeline::parse(uint64_t seq, std::shared_ptr<RawBatch> raw) {
  const uint64_t t0 = nowNs();
  Output out;
  uint64_t badExamples = 0, bytes = 0;
  std::vector<std::string> msgs;
  try {
    std::shared_ptr<Batch> b = Recycler<Batch>::get(
        batches_, [&] { return std::make_unique<Batch>(o_.schema, o_.batchSize); }, [](const Batch&) { return true; });
    b->reset();
    for (size_t i = 0; i < raw->rows(); ++i) {
      try {
        b->add(raw->data[i], raw->size[i]);
      } catch (const ParseError& e) {
        std::string msg = o_.files[raw->file[i]] + ": record at byte offset " + std::to_string(raw->offset[i]) +
                          (e.feature.empty() ? "" : ", feature '" + e.feature + "'") + ": " + e.what();
        if (o_.onError == OnError::kRaise)
          DTRAIN_THROW(kData, msg, "; fix the spec or the data, or pass on_error='skip' to leave such records out");
        ++badExamples;
        msgs.push_back(std::move(msg));
        continue;
      }
      b->offsets.push_back(raw->offset[i]);
      b->files.push_back(raw->file[i]);
      bytes += raw->size[i];
    }
    b->finish();
    out.batch = std::move(b);
  } catch (...) {
    out.error = std::current_exception();
  }
  raw.reset();  // let go of the chunks before waking anyone
  const uint64_t dt = nowNs() - t0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stats_.parseNs += dt;
    stats_.badExamples += badExamples;
    for (auto& m : msgs) note(m);
    if (out.batch) {
      stats_.records += out.batch->rows();
      stats_.bytes += bytes;
    }
    results_[seq] = std::move(out);
    if (outWaiting_) cvOut_.notify_one();
  }
}

// ---------------------------------------------------------------- assembler

void Pipeline::assemblerLoop() {
  try {
    assemble();
  } catch (...) {  // an internal failure: hand it to the consumer in order
    std::lock_guard<std::mutex> lk(mu_);
    results_[nextSeq_].error = std::current_exception();
    totalSeq_ = nextSeq_ + 1;
  }
  cvOut_.notify_all();
}

Pipeline::Pull Pipeline::pull(size_t slot, const uint8_t*& data, uint64_t& size, uint64_t& offset, int32_t& file,
                              std::shared_ptr<const Chunk>& chunk, std::exception_ptr& error) {
  for (;;) {
    const std::shared_ptr<const Chunk>& c = cur_[slot];
    if (c) {
      size_t& i = pos_[slot];
      if (i < c->rows()) {
        data = c->data[i];
        size = c->size[i];
        offset = c->offset[i];
        file = c->file[i];
        chunk = c;
        ++i;
        return Pull::kRecord;
      }
      if (c->error) {
        error = c->error;
        return Pull::kError;
      }
      cur_[slot].reset();
    }
    const int s = slots_[slot];
    std::unique_lock<std::mutex> lk(mu_);
    SegState& st = *st_[s];
    if (st.queue.empty() && !st.done) {
      wanted_ = s;
      if (idle_) cvWork_.notify_all();
      asmWaiting_ = true;
      cvAsm_.wait(lk, [&] { return stop_ || !st.queue.empty() || st.done; });
      asmWaiting_ = false;
      wanted_ = -1;
    }
    if (stop_) return Pull::kStop;
    if (st.queue.empty()) return Pull::kEnd;
    queued_ -= st.queue.front()->bytes;
    cur_[slot] = std::move(st.queue.front());
    st.queue.pop_front();
    pos_[slot] = 0;
    if (idle_) cvWork_.notify_one();  // room in this segment's queue
  }
}

bool Pipeline::submit() {
  std::shared_ptr<RawBatch> raw = std::move(open_);
  open_.reset();
  std::unique_lock<std::mutex> lk(mu_);
  asmWaiting_ = true;
  cvAsm_.wait(lk, [&] { return stop_ || failed_ || nextSeq_ < nextOut_ + o_.prefetch + o_.workers; });
  asmWaiting_ = false;
  if (stop_ || failed_) return false;
  const uint64_t seq = nextSeq_++;
  if (!o_.schema) {  // raw records need no parsing
    for (size_t i = 0; i < raw->rows(); ++i) stats_.bytes += raw->size[i];
    stats_.records += raw->rows();
    results_[seq].raw = std::move(raw);
    if (outWaiting_) cvOut_.notify_one();
    return true;
  }
  parseQueue_.emplace_back(seq, std::move(raw));
  if (idle_) cvWork_.notify_one();
  return true;
}

void Pipeline::deliver(const uint8_t* data, uint64_t size, uint64_t offset, int32_t file,
                       const std::shared_ptr<const Chunk>& chunk, std::unique_ptr<uint8_t[]> owned) {
  if (skipLeft_ > 0) {
    --skipLeft_;
    std::lock_guard<std::mutex> lk(mu_);
    ++stats_.resumed;
    return;
  }
  if (!open_) {
    open_ = std::make_shared<RawBatch>();
    open_->data.reserve(o_.batchSize);
  }
  RawBatch& b = *open_;
  b.data.push_back(data);
  b.size.push_back(size);
  b.offset.push_back(offset);
  b.file.push_back(file);
  if (owned)
    b.own.push_back(std::move(owned));
  else if (b.hold.empty() || b.hold.back() != chunk)
    b.hold.push_back(chunk);
}

void Pipeline::assemble() {
  // tf.data's interleave order: `cycle` slots take turns, `block` records a turn. A slot
  // found empty on its turn opens the next segment and serves the turn from it; a
  // segment found exhausted on its turn leaves its slot empty and the turn passes on.
  const size_t cycle = slots_.size();
  size_t rr = 0, turn = 0, open = cycle;
  auto advance = [&] {
    turn = 0;
    rr = (rr + 1) % cycle;
  };
  auto full = [&] { return open_ && open_->rows() >= o_.batchSize; };
  auto emit = [&](Owned&& r) {
    const uint8_t* p = r.data.get();
    deliver(p, r.size, r.offset, r.file, nullptr, std::move(r.data));
  };
  for (;;) {
    if (full() && !submit()) return;
    if (open == 0 && nextSeg_ >= segs_.size()) break;
    if (slots_[rr] < 0) {
      if (nextSeg_ >= segs_.size()) {
        advance();
        continue;
      }
      std::lock_guard<std::mutex> lk(mu_);
      slots_[rr] = static_cast<int>(nextSeg_++);
      ++open;
      if (idle_) cvWork_.notify_all();
    }
    const uint8_t* data;
    uint64_t size, offset;
    int32_t file;
    std::shared_ptr<const Chunk> chunk;
    std::exception_ptr error;
    Pull got = pull(rr, data, size, offset, file, chunk, error);
    if (got == Pull::kStop) return;
    if (got == Pull::kError) {
      if (open_ && open_->rows() && !submit()) return;  // the records before the error come first
      std::lock_guard<std::mutex> lk(mu_);
      results_[nextSeq_].error = error;
      totalSeq_ = nextSeq_ + 1;
      return;
    }
    if (got == Pull::kEnd) {
      std::lock_guard<std::mutex> lk(mu_);
      slots_[rr] = -1;
      --open;
      cur_[rr].reset();
      pos_[rr] = 0;
      if (idle_) cvWork_.notify_all();
      advance();
      continue;
    }
    if (++turn >= o_.block) advance();
    if (o_.shuffleBuffer == 0) {
      deliver(data, size, offset, file, chunk, nullptr);
      continue;
    }
    Owned r{std::unique_ptr<uint8_t[]>(new uint8_t[size ? size : 1]), size, offset, file};
    std::memcpy(r.data.get(), data, size);
    if (shuffle_.size() < o_.shuffleBuffer) {
      shuffle_.push_back(std::move(r));
      continue;
    }
    const size_t j = rand() % shuffle_.size();
    std::swap(shuffle_[j], r);
    emit(std::move(r));
  }
  while (!shuffle_.empty()) {  // drain in random order
    if (full() && !submit()) return;
    const size_t j = rand() % shuffle_.size();
    Owned r = std::move(shuffle_[j]);
    shuffle_[j] = std::move(shuffle_.back());
    shuffle_.pop_back();
    emit(std::move(r));
  }
  if (open_ && open_->rows()) {
    if (o_.dropRemainder && open_->rows() < o_.batchSize) {
      std::lock_guard<std::mutex> lk(mu_);
      stats_.dropped += open_->rows();
      open_.reset();
    } else if (!submit()) {
      return;
    }
  }
  std::lock_guard<std::mutex> lk(mu_);
  totalSeq_ = nextSeq_;
}

uint64_t countRecords(const std::string& path, Compression c, OnError onError) {
  RecordReader reader(path, c, onError, /*verify=*/true, 1 << 20);
  Record r;
  uint64_t n = 0;
  while (reader.next(r)) ++n;
  return n;
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

#include "data/example.h"

#include <algorithm>
#include <cstring>

namespace dtrain {
namespace data {

const char* ftypeName(FType t) {
  switch (t) {
    case FType::kFloat32: return "float32";
    case FType::kInt64: return "int64";
    case FType::kUInt8: return "uint8";
    case FType::kBytes: return "bytes";
  }
  return "?";
}

size_t ftypeSize(FType t) {
  switch (t) {
    case FType::kFloat32: return 4;
    case FType::kInt64: return 8;
    case FType::kUInt8: return 1;
    case FType::kBytes: return 0;
  }
  return 0;
}

namespace {

constexpr int kVarint = 0, kFixed64 = 1, kLen = 2, kFixed32 = 5;
const char* const kKindName[] = {"an empty Feature", "a bytes_list", "a float_list", "an int64_list"};

struct Wire {
  const uint8_t* p;
  const uint8_t* end;
  const std::string* feature;  // for errors

  [[noreturn]] void fail(const std::string& what) const { throw ParseError(feature ? *feature : "", what); }

  bool more() const { return p < end; }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (p >= end) fail("a varint runs past the end of its message (truncated or not an Example)");
      uint8_t b = *p++;
      if (shift == 63 && b > 1) fail("a varint is longer than 64 bits (not an Example)");
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    fail("a varint is longer than 10 bytes (not an Example)");
  }

  // Reads a tag; returns false at the end of the message.
  bool tag(uint32_t& field, int& wt) {
    if (p >= end) return false;
    uint64_t t = varint();
    field = static_cast<uint32_t>(t >> 3);
    wt = static_cast<int>(t & 7);
    if (field == 0) fail("field number 0 in a protobuf message (not an Example)");
    return true;
  }

  Wire sub() {
    uint64_t n = varint();
    if (n > static_cast<uint64_t>(end - p))
      fail("a length-delimited field says " + std::to_string(n) + " bytes but only " + std::to_string(end - p) +
           " remain in its message (truncated or not an Example)");
    Wire w{p, p + n, feature};
    p += n;
    return w;
  }

  void skip(int wt) {
    switch (wt) {
      case kVarint: varint(); return;
      case kFixed64: need(8); p += 8; return;
      case kLen: sub(); return;
      case kFixed32: need(4); p += 4; return;
      default: fail("wire type " + std::to_string(wt) + " (groups or invalid) in an Example");
    }
  }

  void need(size_t n) {
    if (static_cast<size_t>(end - p) < n) fail("a fixed-width field runs past the end of its message");
  }
};

// The list inside a Feature: which kind it is (0 when the Feature is empty) and its bytes.
struct ListRef {
  int kind = 0;
  Wire list{nullptr, nullptr, nullptr};
};

ListRef featureList(Wire f) {
  ListRef r;
  uint32_t field;
  int wt;
  while (f.tag(field, wt)) {
    if (field >= 1 && field <= 3 && wt == kLen) {
      r.kind = static_cast<int>(field);  // a oneof: the last one set wins
      r.list = f.sub();
    } else {
      f.skip(wt);
    }
  }
  return r;
}

// Walks a list's values, checking the wire as it goes: each bytes value goes to
// onBytes(ptr, n), each run of float32s to onFloats(ptr, count) (little-endian, as on
// the wire), each int64 to onInt(v). Packed and unpacked encodings both arrive here.
template <typename OnBytes, typename OnFloats, typename OnInt>
void visitValues(int kind, Wire w, OnBytes&& onBytes, OnFloats&& onFloats, OnInt&& onInt) {
  uint32_t field;
  int wt;
  while (w.tag(field, wt)) {
    if (field != 1) {
      w.skip(wt);
      continue;
    }
    if (kind == 1) {
      if (wt != kLen) w.fail("a bytes_list value with wire type " + std::to_string(wt));
      Wire v = w.sub();
      onBytes(v.p, static_cast<size_t>(v.end - v.p));
    } else if (kind == 2) {
      if (wt == kLen) {
        Wire v = w.sub();
        size_t nb = v.end - v.p;
        if (nb % 4) w.fail("a packed float_list of " + std::to_string(nb) + " bytes (not a multiple of 4)");
        onFloats(v.p, nb / 4);
      } else if (wt == kFixed32) {
        w.need(4);
        onFloats(w.p, 1);
        w.p += 4;
      } else {
        w.fail("a float_list value with wire type " + std::to_string(wt));
      }
    } else {
      if (wt == kLen) {
        Wire v = w.sub();
        while (v.more()) onInt(v.varint());
      } else if (wt == kVarint) {
        onInt(w.varint());
      } else {
        w.fail("an int64_list value with wire type " + std::to_string(wt));
      }
    }
  }
}

// Values in a list (and, for bytes, their total size), counted without storing them.
uint64_t countValues(int kind, Wire w, uint64_t* bytes = nullptr) {
  uint64_t n = 0;
  visitValues(
      kind, w,
      [&](const uint8_t*, size_t k) {
        ++n;
        if (bytes) *bytes += k;
      },
      [&](const uint8_t*, size_t c) { n += c; }, [&](uint64_t) { ++n; });
  return n;
}

// Writes the list's values: numbers to `out` (float32 or int64), bytes values to a sink.
template <typename BytesSink>
void copyValues(int kind, Wire w, uint8_t* out, BytesSink&& sink) {
  visitValues(
      kind, w, sink,
      [&](const uint8_t* p, size_t c) {
        std::memcpy(out, p, c * 4);
        out += c * 4;
      },
      [&](uint64_t v) {
        int64_t s = static_cast<int64_t>(v);
        std::memcpy(out, &s, 8);
        out += 8;
      });
}

int kindFor(FType t) { return t == FType::kFloat32 ? 2 : t == FType::kInt64 ? 3 : 1; }

std::string shapeText(const FeatureSpec& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.shape.size(); ++i) out += (i ? ", " : "") + std::to_string(s.shape[i]);
  if (s.shape.size() == 1) out += ",";
  return out + ")";
}

}  // namespace

// ------------------------------------------------------------------- Batch

Batch::Batch(std::shared_ptr<const Schema> schema, size_t capacity)
    : schema_(std::move(schema)), capacity_(capacity) {
  const auto& fs = schema_->features;
  cols_.resize(fs.size());
  at_.resize(fs.size());
  len_.resize(fs.size());
  seen_.resize(fs.size());
  for (size_t i = 0; i < fs.size(); ++i) {
    const FeatureSpec& s = fs[i];
    if (!s.varlen && s.dtype != FType::kBytes) cols_[i].data.resize(capacity * s.numel * ftypeSize(s.dtype));
    if (s.varlen) cols_[i].lengths.reserve(capacity);
  }
  offsets.reserve(capacity);
}

void Batch::add(const uint8_t* p, size_t n) {
  if (rows_ >= capacity_) throw ParseError("", "internal: batch is full");
  const auto& fs = schema_->features;
  const size_t nf = fs.size();
  std::fill(seen_.begin(), seen_.end(), 0);

  // 1. Where each declared feature's Feature message lies (the last entry for a key wins).
  auto scanFeatures = [&](Wire feats) {
    uint32_t field;
    int wt;
    while (feats.tag(field, wt)) {
      if (field != 1 || wt != kLen) {
        feats.skip(wt);
        continue;
      }
      Wire entry = feats.sub();
      const uint8_t* key = nullptr;
      size_t keyLen = 0;
      const uint8_t* val = nullptr;
      size_t valLen = 0;
      uint32_t ef;
      int ewt;
      while (entry.tag(ef, ewt)) {
        if (ef == 1 && ewt == kLen) {
          Wire k = entry.sub();
          key = k.p;
          keyLen = k.end - k.p;
        } else if (ef == 2 && ewt == kLen) {
          Wire v = entry.sub();
          val = v.p;
          valLen = v.end - v.p;
        } else {
          entry.skip(ewt);
        }
      }
      for (size_t i = 0; i < nf; ++i) {
        const std::string& name = fs[i].name;
        if (name.size() == keyLen && (keyLen == 0 || std::memcmp(name.data(), key, keyLen) == 0)) {
          at_[i] = val;  // null: an entry without a value is an empty Feature
          len_[i] = valLen;
          seen_[i] = 1;
        }
      }
    }
  };
  Wire ex{p, p + n, nullptr};
  uint32_t field;
  int wt;
  while (ex.tag(field, wt)) {
    if (field == 1 && wt == kLen) scanFeatures(ex.sub());  // features (or a SequenceExample's context)
    else ex.skip(wt);
  }

  // 2. Check every feature before writing any (a bad record leaves no trace).
  struct Plan {
    ListRef list;
    uint64_t count = 0, bytes = 0;
  };
  Plan plans[64];
  std::vector<Plan> many;
  Plan* plan = plans;
  if (nf > 64) {
    many.resize(nf);
    plan = many.data();
  }
  for (size_t i = 0; i < nf; ++i) {
    const FeatureSpec& s = fs[i];
    if (!seen_[i]) {
      if (!s.varlen && !s.hasDefault)
        throw ParseError(s.name, "feature '" + s.name + "' is missing and its FixedLen has no default "
                                 "(give default=... or declare it VarLen)");
      continue;
    }
    Wire f{at_[i], at_[i] + len_[i], &s.name};
    plan[i].list = featureList(f);
    int kind = plan[i].list.kind;
    if (kind != 0 && kind != kindFor(s.dtype))
      throw ParseError(s.name, "feature '" + s.name + "' is " + kKindName[kind] + " but the spec says " +
                                   ftypeName(s.dtype) + " (float_list: float32; int64_list: int64; "
                                   "bytes_list: uint8 or bytes)");
    plan[i].count = kind ? countValues(kind, plan[i].list.list, &plan[i].bytes) : 0;
    if (!s.varlen) {
      uint64_t have = s.dtype == FType::kUInt8 ? plan[i].bytes : plan[i].count;
      if (have != static_cast<uint64_t>(s.numel))
        throw ParseError(s.name, "feature '" + s.name + "' has " + std::to_string(have) +
                                     (s.dtype == FType::kUInt8 ? " bytes" : " values") + " but FixedLen" +
                                     shapeText(s) + " needs " + std::to_string(s.numel) +
                                     " (declare VarLen for a varying count)");
    }
  }

  // 3. Write.
  for (size_t i = 0; i < nf; ++i) {
    const FeatureSpec& s = fs[i];
    Column& c = cols_[i];
    const size_t es = ftypeSize(s.dtype);
    if (!seen_[i] && !s.varlen) {  // the default
      if (s.dtype == FType::kBytes) {
        c.data.insert(c.data.end(), s.defaults.begin(), s.defaults.end());
        c.valueLens.insert(c.valueLens.end(), s.defaultLens.begin(), s.defaultLens.end());
      } else {
        std::memcpy(c.data.data() + rows_ * s.numel * es, s.defaults.data(), s.numel * es);
      }
      continue;
    }
    const Plan& pl = plan[i];
    const int kind = pl.list.kind;
    if (s.varlen) {
      uint64_t n = s.dtype == FType::kUInt8 ? pl.bytes : pl.count;
      c.lengths.push_back(static_cast<int64_t>(n));
      if (!kind) continue;
      if (s.dtype == FType::kBytes) {
        copyValues(kind, pl.list.list, nullptr, [&](const uint8_t* v, size_t k) {
          c.data.insert(c.data.end(), v, v + k);
          c.valueLens.push_back(k);
        });
      } else if (s.dtype == FType::kUInt8) {
        copyValues(kind, pl.list.list, nullptr, [&](const uint8_t* v, size_t k) {
          c.data.insert(c.data.end(), v, v + k);
        });
      } else {
        size_t old = c.data.size();
        c.data.resize(old + n * es);
        copyValues(kind, pl.list.list, c.data.data() + old, [](const uint8_t*, size_t) {});
      }
      continue;
    }
    if (s.dtype == FType::kBytes) {
      copyValues(kind, pl.list.list, nullptr, [&](const uint8_t* v, size_t k) {
        c.data.insert(c.data.end(), v, v + k);
        c.valueLens.push_back(k);
      });
    } else if (s.dtype == FType::kUInt8) {
      uint8_t* dst = c.data.data() + rows_ * s.numel;
      if (kind)
        copyValues(kind, pl.list.list, nullptr, [&](const uint8_t* v, size_t k) {
          std::memcpy(dst, v, k);
          dst += k;
        });
    } else if (kind) {
      copyValues(kind, pl.list.list, c.data.data() + rows_ * s.numel * es, [](const uint8_t*, size_t) {});
    }
  }
  ++rows_;
}

void Batch::finish() {
  const auto& fs = schema_->features;
  for (size_t i = 0; i < fs.size(); ++i) {
    const FeatureSpec& s = fs[i];
    Column& c = cols_[i];
    if (!s.varlen) {
      if (s.dtype != FType::kBytes) c.data.resize(rows_ * s.numel * ftypeSize(s.dtype));
      continue;
    }
    if (s.dtype == FType::kBytes) continue;
    const size_t es = ftypeSize(s.dtype);
    c.maxLen = 0;
    for (int64_t l : c.lengths) c.maxLen = std::max(c.maxLen, l);
    c.padded.assign(rows_ * c.maxLen * es, 0);
    size_t off = 0;
    for (size_t r = 0; r < rows_; ++r) {
      size_t nb = c.lengths[r] * es;
      std::memcpy(c.padded.data() + r * c.maxLen * es, c.data.data() + off, nb);
      off += nb;
    }
  }
}

void Batch::reset() {
  const auto& fs = schema_->features;
  for (size_t i = 0; i < fs.size(); ++i) {
    const FeatureSpec& s = fs[i];
    Column& c = cols_[i];
    c.lengths.clear();
    c.valueLens.clear();
    c.padded.clear();
    c.maxLen = 0;
    if (!s.varlen && s.dtype != FType::kBytes)
      c.data.resize(capacity_ * s.numel * ftypeSize(s.dtype));
    else
      c.data.clear();
  }
  offsets.clear();
  files.clear();
  rows_ = 0;
}

// ------------------------------------------------------------------ inspect

std::vector<FoundFeature> inspectExample(const uint8_t* p, size_t n, bool sequence) {
  (void)sequence;  // a SequenceExample's context is field 1, like an Example's features
  std::vector<FoundFeature> out;
  Wire ex{p, p + n, nullptr};
  uint32_t field;
  int wt;
  while (ex.tag(field, wt)) {
    if (field != 1 || wt != kLen) {
      ex.skip(wt);
      continue;
    }
    Wire feats = ex.sub();
    while (feats.tag(field, wt)) {
      if (field != 1 || wt != kLen) {
        feats.skip(wt);
        continue;
      }
      Wire entry = feats.sub();
      std::string key;
      Wire val{nullptr, nullptr, nullptr};
      uint32_t ef;
      int ewt;
      while (entry.tag(ef, ewt)) {
        if (ef == 1 && ewt == kLen) {
          Wire k = entry.sub();
          key.assign(reinterpret_cast<const char*>(k.p), k.end - k.p);
        } else if (ef == 2 && ewt == kLen) {
          val = entry.sub();
        } else {
          entry.skip(ewt);
        }
      }
      FoundFeature f{key, 0, 0, 0};
      if (val.p) {
        val.feature = &f.name;
        ListRef l = featureList(val);
        f.kind = l.kind;
        if (l.kind) f.count = countValues(l.kind, l.list, &f.bytes);
      }
      auto same = std::find_if(out.begin(), out.end(), [&](const FoundFeature& o) { return o.name == key; });
      if (same != out.end()) *same = f;  // the last entry for a key wins
      else out.push_back(f);
    }
  }
  return out;
}

// ------------------------------------------------------------------- encode

namespace {

void putVarint(std::string& s, uint64_t v) {
  while (v >= 0x80) {
    s.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  s.push_back(static_cast<char>(v));
}

void putLen(std::string& s, uint32_t field, const std::string& body) {
  putVarint(s, (uint64_t(field) << 3) | kLen);
  putVarint(s, body.size());
  s += body;
}

}  // namespace

void encodeExample(const std::vector<EncodeFeature>& features, std::string& out) {
  std::string feats, entry, feature, list, packed;
  for (const EncodeFeature& f : features) {
    list.clear();
    if (f.kind == 1) {
      size_t off = 0;
      for (size_t i = 0; i < f.count; ++i) {
        putVarint(list, (1 << 3) | kLen);
        putVarint(list, f.lens[i]);
        list.append(reinterpret_cast<const char*>(f.data) + off, f.lens[i]);
        off += f.lens[i];
      }
    } else if (f.count > 0) {
      packed.clear();
      if (f.kind == 2) {
        packed.assign(reinterpret_cast<const char*>(f.data), f.count * 4);
      } else {
        const int64_t* v = reinterpret_cast<const int64_t*>(f.data);
        for (size_t i = 0; i < f.count; ++i) putVarint(packed, static_cast<uint64_t>(v[i]));
      }
      putLen(list, 1, packed);
    }
    feature.clear();
    if (f.kind != 0) putLen(feature, static_cast<uint32_t>(f.kind), list);  // 0: an empty Feature
    entry.clear();
    putLen(entry, 1, f.name);
    putLen(entry, 2, feature);
    putLen(feats, 1, entry);
  }
  out.clear();
  putLen(out, 1, feats);
}

}  // namespace data
}  // namespace dtrain

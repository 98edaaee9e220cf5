// The parameter server's wire protocol (version 1).
//
// A connection first passes the job-token handshake (role "ps"), so nothing from a
// process without the token is ever read as a message. Then every message is one
// fixed 48-byte header, little-endian, followed by exactly `bytes` bytes of payload:
//
//   Hello      worker -> server  count = shard elements the worker expects, clock = layout hash,
//                                aux = parameter groups
//   Welcome    server -> worker  clock = the clock this worker starts at
//   PushPull   worker -> server  clock = pushes done before this one, aux = wire dtype,
//                                count = shard elements; payload = gradient (count elements of
//                                the wire dtype), then one float64 learning rate per group
//   Pull       worker -> server  no payload; the current parameters come back at once
//   Params     server -> worker  clock = updates applied, offset = slowest live worker's clock,
//                                aux = this worker's lead over it; payload = count float32
//   Control    worker -> server  aux = 1 save / 2 load, clock = step; payload = a path (UTF-8)
//   Reply      server -> worker  aux = 1 ok / 0 failed; payload = a message (UTF-8)
//   Stats      worker -> server  no payload; answered by a Reply holding JSON
//   Done       worker -> server  the worker has finished; the server closes the connection
//   Error      server -> worker  payload = why (UTF-8); the server closes the connection
//
// The receiver checks magic, version, type, worker id, sizes and dtype before it reads
// a payload; a message that fails any check is logged and its connection dropped,
// never applied.
#pragma once

#include <cstdint>
#include <string>

#include "common/dtype.h"

namespace dtrain {
namespace ps {

constexpr uint32_t kMagic = 0x53505444;  // "DTPS"
constexpr uint16_t kVersion = 1;
constexpr uint64_t kMaxTextBytes = 1 << 16;  // paths, messages, stats

enum class Msg : uint16_t {
  kHello = 1, kWelcome, kPushPull, kPull, kParams, kControl, kReply, kStats, kDone, kError
};
enum Control : uint32_t { kSave = 1, kLoad = 2 };

#pragma pack(push, 1)
struct Header {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t type = 0;
  int32_t worker = -1;
  uint32_t aux = 0;
  uint64_t clock = 0;
  uint64_t offset = 0;
  uint64_t count = 0;
  uint64_t bytes = 0;
};
#pragma pack(pop)
static_assert(sizeof(Header) == 48, "the wire header is 48 bytes");

inline Header make(Msg type, int worker) {
  Header h;
  h.type = static_cast<uint16_t>(type);
  h.worker = worker;
  return h;
}

inline const char* msgName(uint16_t t) {
  switch (static_cast<Msg>(t)) {
    case Msg::kHello: return "Hello";
    case Msg::kWelcome: return "Welcome";
    case Msg::kPushPull: return "PushPull";
    case Msg::kPull: return "Pull";
    case Msg::kParams: return "Params";
    case Msg::kControl: return "Control";
    case Msg::kReply: return "Reply";
    case Msg::kStats: return "Stats";
    case Msg::kDone: return "Done";
    case Msg::kError: return "Error";
  }
  return "unknown";
}

// Gradients travel as float32, float16 or bfloat16.
inline bool wireDtypeOk(uint32_t code) {
  return code == static_cast<uint32_t>(DType::kFloat32) || code == static_cast<uint32_t>(DType::kFloat16) ||
         code == static_cast<uint32_t>(DType::kBFloat16);
}

// "" when the envelope is sound, else what is wrong with it.
inline std::string checkEnvelope(const Header& h) {
  if (h.magic != kMagic) return "bad magic (not a dtrain parameter-server message)";
  if (h.version != kVersion)
    return "protocol version " + std::to_string(h.version) + ", this server speaks " + std::to_string(kVersion) +
           " (run the same dtrain on every rank)";
  if (h.type < static_cast<uint16_t>(Msg::kHello) || h.type > static_cast<uint16_t>(Msg::kError))
    return "unknown message type " + std::to_string(h.type);
  return "";
}

}  // namespace ps
}  // namespace dtrain

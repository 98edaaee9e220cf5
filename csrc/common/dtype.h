// Element types and reduction operators understood by the native backend.
#pragma once

#include <cstddef>
#include <cstdint>

namespace dtrain {

// Values are part of the wire descriptor: append, never renumber.
enum class DType : uint8_t { kFloat32 = 0, kFloat64, kFloat16, kBFloat16, kInt32, kInt64, kUInt8 };
enum class RedOp : uint8_t { kSum = 0, kAvg, kMin, kMax, kProd };

constexpr int kNumDTypes = 7;

inline size_t dtypeSize(DType t) {
  switch (t) {
    case DType::kFloat64: case DType::kInt64: return 8;
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kUInt8: return 1;
  }
  return 0;
}

inline const char* dtypeName(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    case DType::kUInt8: return "uint8";
  }
  return "?";
}

inline const char* redOpName(RedOp op) {
  switch (op) {
    case RedOp::kSum: return "sum";
    case RedOp::kAvg: return "avg";
    case RedOp::kMin: return "min";
    case RedOp::kMax: return "max";
    case RedOp::kProd: return "prod";
  }
  return "?";
}

inline bool isFloating(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat64 || t == DType::kFloat16 ||
         t == DType::kBFloat16;
}

inline bool isHalf(DType t) { return t == DType::kFloat16 || t == DType::kBFloat16; }

}  // namespace dtrain

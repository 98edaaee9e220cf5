// One-line logs to stderr that say which rank wrote them.
#pragma once

#include <cstdio>
#include <string>

#include "common/error.h"

namespace dtrain {

inline int& logRank() {
  static int rank = -1;
  return rank;
}

template <typename... Args>
void logWarning(const Args&... args) {
  std::string line = detail::concat("[dtrain rank ", logRank(), "] WARNING: ", args..., "\n");
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace dtrain

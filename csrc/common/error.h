// Typed errors that cross into Python as dtrain.errors classes.
//
// Every throw names the broken invariant, the values involved and, where there
// is one, the fix; the file:line suffix points at the check that fired.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dtrain {

// Mirrors dtrain/errors.py; the binding maps each kind to its Python class.
enum class ErrorKind { kComm, kTimeout, kRendezvous, kConfig, kData };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& msg) : std::runtime_error(msg), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

namespace detail {

inline const char* baseName(const char* path) {
  const char* base = path;
  for (const char* p = path; *p; ++p) {
    if (*p == '/') base = p + 1;
  }
  return base;
}

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace detail
}  // namespace dtrain

#define DTRAIN_THROW(kind, ...)                                                        \
  throw ::dtrain::Error(::dtrain::ErrorKind::kind,                                     \
                        ::dtrain::detail::concat(__VA_ARGS__, " [",                    \
                                                 ::dtrain::detail::baseName(__FILE__), \
                                                 ":", __LINE__, "]"))

#define DTRAIN_CHECK(cond, kind, ...) \
  do {                                \
    if (!(cond)) DTRAIN_THROW(kind, __VA_ARGS__); \
  } while (0)

// Internal invariants (not user input): a failure here is a dtrain bug.
#define DTRAIN_INTERNAL(cond) \
  DTRAIN_CHECK(cond, kComm, "internal error: ", #cond, " does not hold (please report)")

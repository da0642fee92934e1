// The one error type every copy backend throws: which API failed, with which code, at which copy of the batch.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace kvpool {

class CopyError : public std::runtime_error {
 public:
  CopyError(const std::string& api, long code, std::size_t index, std::size_t count)
      : std::runtime_error(api + " failed with error " + std::to_string(code) + " at copy " + std::to_string(index) +
                           " of " + std::to_string(count)),
        code(code),
        index(index) {}
  long code;
  std::size_t index;
};

// A device runtime library (libascendcl.so, libcuda.so.1) that cannot be loaded or lacks a required symbol.
class BackendUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace kvpool

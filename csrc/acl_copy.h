// Ascend (ACL) batched copies between host DRAM and device HBM. libascendcl.so is loaded with dlopen at run time,
// so this builds and imports everywhere; only calling it needs the library.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "cpu_copy.h"

namespace kvpool::acl {

// aclrtMemcpyKind values from acl_rt.h.
enum class Direction : int { HostToDevice = 1, DeviceToHost = 2 };

// Layouts of acl_rt.h's aclrtMemLocation / aclrtMemcpyBatchAttr (CANN 8.5+); checked against the header in tests.
struct MemLocation {
  std::uint32_t id;
  std::uint32_t type;  // aclrtMemLocationType: 0 host, 1 device
};
struct MemcpyBatchAttr {
  MemLocation dstLoc;
  MemLocation srcLoc;
  std::uint8_t rsv[16];
};

using MemcpyBatchAsyncFn = int (*)(void** dsts, std::size_t* destMaxs, void** srcs, std::size_t* sizes,
                                   std::size_t numBatches, MemcpyBatchAttr* attrs, std::size_t* attrsIndexes,
                                   std::size_t numAttrs, std::size_t* failIndex, void* stream);
using MemcpyAsyncFn = int (*)(void* dst, std::size_t destMax, const void* src, std::size_t count, int kind,
                              void* stream);
using SynchronizeStreamFn = int (*)(void* stream);

// True when `library` loads and has the entry points the copy needs; `batch` reports aclrtMemcpyBatchAsync.
bool available(const std::string& library, bool* batch = nullptr);

// Enqueue every copy on `stream` (aclrtMemcpyBatchAsync when the runtime has it and `use_batch`, else an
// aclrtMemcpyAsync per copy), then synchronize the stream when `synchronize`. Throws CopyError naming the failing copy.
void copy_batch(const std::string& library, const CopyBatch& batch, Direction direction, std::uint32_t device_id,
                std::uintptr_t stream, bool synchronize, bool use_batch = true);

}  // namespace kvpool::acl

#include "acl_copy.h"

#include <vector>

#include "copy_error.h"
#include "dl_runtime.h"

namespace kvpool::acl {

namespace {

struct Runtime {
  MemcpyBatchAsyncFn memcpy_batch_async = nullptr;  // CANN 8.5+ only
  MemcpyAsyncFn memcpy_async = nullptr;
  SynchronizeStreamFn synchronize_stream = nullptr;
};

const Runtime& load(const std::string& library) {
  return load_runtime<Runtime>(library, "the ACL copy backend needs the Ascend CANN runtime", [&](void* handle) {
    Runtime rt;
    rt.memcpy_batch_async = symbol<MemcpyBatchAsyncFn>(handle, "aclrtMemcpyBatchAsync");
    rt.memcpy_async = symbol<MemcpyAsyncFn>(handle, "aclrtMemcpyAsync");
    rt.synchronize_stream = symbol<SynchronizeStreamFn>(handle, "aclrtSynchronizeStream");
    if (rt.memcpy_async == nullptr || rt.synchronize_stream == nullptr) {
      throw BackendUnavailable(library + " lacks aclrtMemcpyAsync or aclrtSynchronizeStream");
    }
    return rt;
  });
}

}  // namespace

bool available(const std::string& library, bool* batch) {
  try {
    const Runtime& rt = load(library);
    if (batch != nullptr) *batch = rt.memcpy_batch_async != nullptr;
    return true;
  } catch (const BackendUnavailable&) {
    return false;
  }
}

void copy_batch(const std::string& library, const CopyBatch& b, Direction direction, std::uint32_t device_id,
                std::uintptr_t stream, bool synchronize, bool use_batch) {
  const Runtime& rt = load(library);
  void* s = reinterpret_cast<void*>(stream);
  const std::size_t n = b.n;
  if (n == 0) return;
  if (use_batch && rt.memcpy_batch_async != nullptr) {
    std::vector<void*> dsts(n), srcs(n);
    std::vector<std::size_t> sizes(b.sizes, b.sizes + n), dest_max(b.sizes, b.sizes + n);
    for (std::size_t i = 0; i < n; ++i) {
      dsts[i] = reinterpret_cast<void*>(b.dsts[i]);
      srcs[i] = reinterpret_cast<void*>(b.srcs[i]);
    }
    const MemLocation host{0, 0}, device{device_id, 1};
    MemcpyBatchAttr attr{};
    attr.dstLoc = direction == Direction::HostToDevice ? device : host;
    attr.srcLoc = direction == Direction::HostToDevice ? host : device;
    std::size_t attr_index = 0;  // one attribute, applying from copy 0 on
    std::size_t fail_index = SIZE_MAX;
    const int rc = rt.memcpy_batch_async(dsts.data(), dest_max.data(), srcs.data(), sizes.data(), n, &attr,
                                         &attr_index, 1, &fail_index, s);
    if (rc != 0) throw CopyError("aclrtMemcpyBatchAsync", rc, fail_index == SIZE_MAX ? 0 : fail_index, n);
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const int rc = rt.memcpy_async(reinterpret_cast<void*>(b.dsts[i]), b.sizes[i],
                                     reinterpret_cast<const void*>(b.srcs[i]), b.sizes[i],
                                     static_cast<int>(direction), s);
      if (rc != 0) throw CopyError("aclrtMemcpyAsync", rc, i, n);
    }
  }
  if (synchronize) {
    const int rc = rt.synchronize_stream(s);
    if (rc != 0) throw CopyError("aclrtSynchronizeStream", rc, n - 1, n);
  }
}

}  // namespace kvpool::acl

#include "cuda_copy.h"

#include <vector>

#include "copy_error.h"
#include "dl_runtime.h"

namespace kvpool::cuda {

namespace {

constexpr int kSrcAccessOrderStream = 1;  // CU_MEMCPY_SRC_ACCESS_ORDER_STREAM

struct Runtime {
  int driver_version = 0;
  MemcpyBatchAsync12080Fn batch_12080 = nullptr;
  MemcpyBatchAsync13000Fn batch_13000 = nullptr;
  MemcpyAsyncFn memcpy_async = nullptr;
  StreamSynchronizeFn stream_synchronize = nullptr;
};

const Runtime& load(const std::string& library) {
  return load_runtime<Runtime>(library, "the CUDA copy backend needs an NVIDIA driver", [&](void* handle) {
    Runtime rt;
    auto get_version = symbol<DriverGetVersionFn>(handle, "cuDriverGetVersion");
    auto get_proc = symbol<GetProcAddressFn>(handle, "cuGetProcAddress_v2");
    rt.memcpy_async = symbol<MemcpyAsyncFn>(handle, "cuMemcpyAsync");
    rt.stream_synchronize = symbol<StreamSynchronizeFn>(handle, "cuStreamSynchronize");
    if (get_version == nullptr || rt.memcpy_async == nullptr || rt.stream_synchronize == nullptr ||
        get_version(&rt.driver_version) != 0) {
      throw BackendUnavailable(library + " lacks the CUDA driver entry points the copy needs");
    }
    // cuGetProcAddress picks the symbol version matching the ABI we ask for, so the signature is the one we call.
    void* fn = nullptr;
    int status = 0;
    if (get_proc != nullptr && rt.driver_version >= 13000 &&
        get_proc("cuMemcpyBatchAsync", &fn, 13000, 0, &status) == 0 && fn != nullptr) {
      rt.batch_13000 = reinterpret_cast<MemcpyBatchAsync13000Fn>(fn);
    } else if (get_proc != nullptr && rt.driver_version >= 12080 &&
               get_proc("cuMemcpyBatchAsync", &fn, 12080, 0, &status) == 0 && fn != nullptr) {
      rt.batch_12080 = reinterpret_cast<MemcpyBatchAsync12080Fn>(fn);
    }
    return rt;
  });
}

}  // namespace

bool available(const std::string& library, bool* batch) {
  try {
    const Runtime& rt = load(library);
    if (batch != nullptr) *batch = rt.batch_12080 != nullptr || rt.batch_13000 != nullptr;
    return true;
  } catch (const BackendUnavailable&) {
    return false;
  }
}

void copy_batch(const std::string& library, const CopyBatch& b, std::uintptr_t stream, bool synchronize, bool use_batch) {
  const Runtime& rt = load(library);
  auto s = reinterpret_cast<CUstream>(stream);
  const std::size_t n = b.n;
  if (n == 0) return;
  if (use_batch && (rt.batch_12080 != nullptr || rt.batch_13000 != nullptr)) {
    std::vector<CUdeviceptr> dsts(b.dsts, b.dsts + n), srcs(b.srcs, b.srcs + n);
    std::vector<std::size_t> sizes(b.sizes, b.sizes + n);
    MemcpyAttributes attr{};
    attr.srcAccessOrder = kSrcAccessOrderStream;
    std::size_t attr_index = 0;
    std::size_t fail_index = 0;
    const CUresult rc =
        rt.batch_13000 != nullptr
            ? rt.batch_13000(dsts.data(), srcs.data(), sizes.data(), n, &attr, &attr_index, 1, s)
            : rt.batch_12080(dsts.data(), srcs.data(), sizes.data(), n, &attr, &attr_index, 1, &fail_index, s);
    if (rc != 0) throw CopyError("cuMemcpyBatchAsync", rc, fail_index, n);
  } else {
    for (std::size_t i = 0; i < n; ++i) {
      const CUresult rc = rt.memcpy_async(b.dsts[i], b.srcs[i], b.sizes[i], s);
      if (rc != 0) throw CopyError("cuMemcpyAsync", rc, i, n);
    }
  }
  if (synchronize) {
    const CUresult rc = rt.stream_synchronize(s);
    if (rc != 0) throw CopyError("cuStreamSynchronize", rc, n - 1, n);
  }
}

}  // namespace kvpool::cuda

// CUDA batched copies between host and device memory through the driver API, resolved at run time from
// libcuda.so.1: no CUDA toolkit at build time, no libtorch. cuMemcpyBatchAsync (CUDA 12.8+) when the driver has it,
// a cuMemcpyAsync per copy when it does not.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "cpu_copy.h"

namespace kvpool::cuda {

using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = void*;

// Layouts of cuda.h's CUmemLocation / CUmemcpyAttributes_v1; checked against the header in tests (nvcc).
struct MemLocation {
  int type;  // CUmemLocationType
  int id;
};
struct MemcpyAttributes {
  int srcAccessOrder;  // CUmemcpySrcAccessOrder
  MemLocation srcLocHint;
  MemLocation dstLocHint;
  unsigned int flags;
};

// CUDA 12.8/12.9 report the failing copy through failIdx; CUDA 13 dropped that argument.
using MemcpyBatchAsync12080Fn = CUresult (*)(CUdeviceptr* dsts, CUdeviceptr* srcs, std::size_t* sizes,
                                             std::size_t count, MemcpyAttributes* attrs, std::size_t* attrIdxs,
                                             std::size_t numAttrs, std::size_t* failIdx, CUstream hStream);
using MemcpyBatchAsync13000Fn = CUresult (*)(CUdeviceptr* dsts, CUdeviceptr* srcs, std::size_t* sizes,
                                             std::size_t count, MemcpyAttributes* attrs, std::size_t* attrIdxs,
                                             std::size_t numAttrs, CUstream hStream);
using MemcpyAsyncFn = CUresult (*)(CUdeviceptr dst, CUdeviceptr src, std::size_t ByteCount, CUstream hStream);
using StreamSynchronizeFn = CUresult (*)(CUstream hStream);
using DriverGetVersionFn = CUresult (*)(int* driverVersion);
using GetProcAddressFn = CUresult (*)(const char* symbol, void** pfn, int cudaVersion, std::uint64_t flags,
                                      int* symbolStatus);

bool available(const std::string& library, bool* batch = nullptr);

// Enqueue every copy on `stream` (cuMemcpyBatchAsync when the driver has it and `use_batch`, else cuMemcpyAsync per
// copy), then synchronize it when `synchronize`. Throws CopyError naming the failing copy.
void copy_batch(const std::string& library, const CopyBatch& batch, std::uintptr_t stream, bool synchronize,
                bool use_batch = true);

}  // namespace kvpool::cuda

// Compile-only check (nvcc): the types csrc/cuda_copy.h declares match the CUDA headers' ones.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <type_traits>

#include "cuda_copy.h"

namespace k = kvpool::cuda;

static_assert(sizeof(k::MemcpyAttributes) == sizeof(CUmemcpyAttributes_v1), "CUmemcpyAttributes layout");
static_assert(offsetof(k::MemcpyAttributes, srcLocHint) == offsetof(CUmemcpyAttributes_v1, srcLocHint), "srcLoc");
static_assert(offsetof(k::MemcpyAttributes, dstLocHint) == offsetof(CUmemcpyAttributes_v1, dstLocHint), "dstLoc");
static_assert(offsetof(k::MemcpyAttributes, flags) == offsetof(CUmemcpyAttributes_v1, flags), "flags");
static_assert(sizeof(k::MemLocation) == sizeof(CUmemLocation), "CUmemLocation layout");
static_assert(sizeof(k::CUdeviceptr) == sizeof(CUdeviceptr_v2), "CUdeviceptr");
static_assert(sizeof(CUstream) == sizeof(k::CUstream), "CUstream");
static_assert(static_cast<int>(CU_MEMCPY_SRC_ACCESS_ORDER_STREAM) == 1, "access order value we pass");

// Same parameter lists as the driver's typedefs (modulo our stand-in struct and handle types).
template <typename T> struct arity;
template <typename R, typename... A> struct arity<R (*)(A...)> { static constexpr std::size_t value = sizeof...(A); };
static_assert(arity<k::MemcpyBatchAsync12080Fn>::value == arity<PFN_cuMemcpyBatchAsync_v12080>::value, "12.8 ABI");
static_assert(arity<k::MemcpyBatchAsync13000Fn>::value == arity<PFN_cuMemcpyBatchAsync_v13000>::value, "13.0 ABI");
static_assert(arity<k::MemcpyAsyncFn>::value == arity<PFN_cuMemcpyAsync_v4000>::value, "cuMemcpyAsync ABI");
static_assert(arity<k::GetProcAddressFn>::value == arity<PFN_cuGetProcAddress_v12000>::value, "cuGetProcAddress");

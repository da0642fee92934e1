// Python face of the native block copy: raw addresses and sizes in, no libtorch. Every copy releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include <stdexcept>
#include <string>
#include <tuple>

#include "acl_copy.h"
#include "copy_error.h"
#include "cpu_copy.h"
#include "cuda_copy.h"

namespace nb = nanobind;
using kvpool::CopyBatch;

namespace {

using U64Array = nb::ndarray<const std::uint64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

CopyBatch make_batch(const U64Array& dsts, const U64Array& srcs, const U64Array& sizes) {
  if (dsts.shape(0) != srcs.shape(0) || dsts.shape(0) != sizes.shape(0)) {
    throw std::invalid_argument("copy batch: dsts, srcs and sizes must have the same length (got " +
                                std::to_string(dsts.shape(0)) + ", " + std::to_string(srcs.shape(0)) + ", " +
                                std::to_string(sizes.shape(0)) + ")");
  }
  CopyBatch b{dsts.data(), srcs.data(), sizes.data(), dsts.shape(0)};
  for (std::size_t i = 0; i < b.n; ++i) {
    if (b.sizes[i] != 0 && (b.dsts[i] == 0 || b.srcs[i] == 0)) {
      throw std::invalid_argument("copy batch: null address at copy " + std::to_string(i));
    }
  }
  return b;
}

kvpool::acl::Direction acl_direction(const std::string& direction) {
  if (direction == "h2d") return kvpool::acl::Direction::HostToDevice;
  if (direction == "d2h") return kvpool::acl::Direction::DeviceToHost;
  throw std::invalid_argument("direction must be 'h2d' or 'd2h', got '" + direction + "'");
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "Batched block copies between KV memory and host DRAM: CPU threads, Ascend ACL, CUDA.";
  nb::exception<kvpool::CopyError>(m, "CopyError", PyExc_RuntimeError);
  nb::exception<kvpool::BackendUnavailable>(m, "BackendUnavailable", PyExc_RuntimeError);

  m.def(
      "cpu_copy_batch",
      [](const U64Array& dsts, const U64Array& srcs, const U64Array& sizes, int threads) {
        const CopyBatch batch = make_batch(dsts, srcs, sizes);
        nb::gil_scoped_release release;
        kvpool::cpu_copy_batch(batch, threads);
      },
      nb::arg("dsts"), nb::arg("srcs"), nb::arg("sizes"), nb::arg("threads") = 1,
      "Copy sizes[i] bytes from srcs[i] to dsts[i] for every i on up to `threads` threads.");

  m.def(
      "acl_available",
      [](const std::string& library) {
        bool batch = false;
        const bool ok = kvpool::acl::available(library, &batch);
        return std::make_tuple(ok, batch);
      },
      nb::arg("library"), "(loadable, has aclrtMemcpyBatchAsync) for an ACL runtime library.");
  m.def(
      "acl_copy_batch",
      [](const U64Array& dsts, const U64Array& srcs, const U64Array& sizes, const std::string& direction,
         std::uint32_t device_id, std::uintptr_t stream, bool synchronize, bool use_batch, const std::string& library) {
        const auto dir = acl_direction(direction);
        const CopyBatch batch = make_batch(dsts, srcs, sizes);
        nb::gil_scoped_release release;
        kvpool::acl::copy_batch(library, batch, dir, device_id, stream, synchronize, use_batch);
      },
      nb::arg("dsts"), nb::arg("srcs"), nb::arg("sizes"), nb::arg("direction"), nb::arg("device_id") = 0,
      nb::arg("stream") = 0, nb::arg("synchronize") = true, nb::arg("batch") = true, nb::arg("library") = "libascendcl.so",
      "Host<->device copies on an ACL stream; raises CopyError naming the failing copy.");

  m.def(
      "cuda_available",
      [](const std::string& library) {
        bool batch = false;
        const bool ok = kvpool::cuda::available(library, &batch);
        return std::make_tuple(ok, batch);
      },
      nb::arg("library"), "(loadable, has cuMemcpyBatchAsync) for a CUDA driver library.");
  m.def(
      "cuda_copy_batch",
      [](const U64Array& dsts, const U64Array& srcs, const U64Array& sizes, std::uintptr_t stream, bool synchronize,
         bool use_batch, const std::string& library) {
        const CopyBatch batch = make_batch(dsts, srcs, sizes);
        nb::gil_scoped_release release;
        kvpool::cuda::copy_batch(library, batch, stream, synchronize, use_batch);
      },
      nb::arg("dsts"), nb::arg("srcs"), nb::arg("sizes"), nb::arg("stream") = 0, nb::arg("synchronize") = true,
      nb::arg("batch") = true, nb::arg("library") = "libcuda.so.1", "Copies on a CUDA stream; raises CopyError naming the failing copy.");
}

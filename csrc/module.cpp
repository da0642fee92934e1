// Python face of the native block copy: raw addresses and sizes in, no libtorch.
#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "cpu_copy.h"

namespace nb = nanobind;

static void copy_batch(std::vector<std::uintptr_t> dsts, std::vector<std::uintptr_t> srcs,
                       std::vector<std::size_t> sizes, int threads) {
  if (dsts.size() != srcs.size() || dsts.size() != sizes.size()) {
    throw std::invalid_argument("copy_batch: dsts, srcs and sizes must have the same length (got " +
                                std::to_string(dsts.size()) + ", " + std::to_string(srcs.size()) + ", " +
                                std::to_string(sizes.size()) + ")");
  }
  for (std::size_t i = 0; i < dsts.size(); ++i) {
    if (sizes[i] != 0 && (dsts[i] == 0 || srcs[i] == 0)) {
      throw std::invalid_argument("copy_batch: null address at piece " + std::to_string(i));
    }
  }
  kvpool::CopyBatch batch{std::move(dsts), std::move(srcs), std::move(sizes)};
  nb::gil_scoped_release release;
  kvpool::cpu_copy_batch(batch, threads);
}

NB_MODULE(_native, m) {
  m.doc() = "Batched block copies between KV memory and host DRAM (CPU backend).";
  m.def("copy_batch", &copy_batch, nb::arg("dsts"), nb::arg("srcs"), nb::arg("sizes"), nb::arg("threads") = 1,
        "Copy sizes[i] bytes from srcs[i] to dsts[i] for every i, on up to `threads` threads, GIL released.");
}

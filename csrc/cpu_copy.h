// Batched memcpy of many (dst, src, size) pieces on a few threads: the CPU backend of the block copy.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kvpool {

// A view of n copies over caller-owned arrays (numpy arrays from Python: no per-element conversion).
struct CopyBatch {
  const std::uint64_t* dsts;
  const std::uint64_t* srcs;
  const std::uint64_t* sizes;
  std::size_t n;
};

// Copies every piece; pieces are split across up to `threads` threads by bytes, not by count.
void cpu_copy_batch(const CopyBatch& batch, int threads);

}  // namespace kvpool

// Batched memcpy of many (dst, src, size) pieces on a few threads: the CPU backend of the block copy.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvpool {

struct CopyBatch {
  std::vector<std::uintptr_t> dsts;
  std::vector<std::uintptr_t> srcs;
  std::vector<std::size_t> sizes;
};

// Copies every piece; pieces are split across up to `threads` threads by bytes, not by count.
void cpu_copy_batch(const CopyBatch& batch, int threads);

}  // namespace kvpool

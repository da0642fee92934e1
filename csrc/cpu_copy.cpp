#include "cpu_copy.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

namespace kvpool {

namespace {
void copy_range(const CopyBatch& b, std::size_t begin, std::size_t end) {
  for (std::size_t i = begin; i < end; ++i) {
    std::memcpy(reinterpret_cast<void*>(b.dsts[i]), reinterpret_cast<const void*>(b.srcs[i]), b.sizes[i]);
  }
}
}  // namespace

void cpu_copy_batch(const CopyBatch& b, int threads) {
  const std::size_t n = b.n;
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) total += b.sizes[i];
  // Below ~1 MiB a thread costs more than it saves.
  const std::size_t useful = std::max<std::size_t>(1, total >> 20);
  const std::size_t workers = std::min<std::size_t>({static_cast<std::size_t>(std::max(threads, 1)), n, useful});
  if (workers <= 1) {
    copy_range(b, 0, n);
    return;
  }
  // Cut the piece list into `workers` ranges of roughly equal bytes.
  std::vector<std::size_t> cuts{0};
  const std::size_t share = total / workers;
  std::size_t acc = 0;
  for (std::size_t i = 0; i < n && cuts.size() < workers; ++i) {
    acc += b.sizes[i];
    if (acc >= share * cuts.size()) cuts.push_back(i + 1);
  }
  cuts.push_back(n);
  std::vector<std::thread> pool;
  for (std::size_t w = 1; w + 1 < cuts.size(); ++w) pool.emplace_back(copy_range, std::cref(b), cuts[w], cuts[w + 1]);
  copy_range(b, cuts[0], cuts[1]);
  for (auto& t : pool) t.join();
}

}  // namespace kvpool

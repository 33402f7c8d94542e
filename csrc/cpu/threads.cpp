// The override behind min_work_per_thread (threads.h), shared by every kernel family.
#include "threads.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>

namespace sparsecore {
namespace {

std::atomic<int64_t> g_min_work{0};  // 0: each family's default

// Sets the override (work <= 0 restores the defaults); returns the previous one, so that a
// caller can put it back.
int64_t _set_min_work_per_thread(int64_t work) {
  return g_min_work.exchange(std::max<int64_t>(work, 0));
}

}  // namespace

int64_t min_work_per_thread(int64_t fallback) {
  const int64_t v = g_min_work.load(std::memory_order_relaxed);
  return v > 0 ? v : fallback;
}

// No tensor arguments: the dispatcher serves such an op from its CompositeExplicitAutograd
// kernel.
TORCH_LIBRARY_IMPL(sparsecore, CompositeExplicitAutograd, m) {
  m.impl("_set_min_work_per_thread", &_set_min_work_per_thread);
}

}  // namespace sparsecore

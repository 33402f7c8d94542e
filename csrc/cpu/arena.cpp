// The output arena (arena.h): free blocks by size, under one lock; the cached bytes are
// capped (SPARSECORE_CPU_ARENA_MB, default 1024), a block that would pass the cap is freed.
#include "arena.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sparsecore {
namespace {

struct Block {
  void* p;
  size_t bytes;
};

class Arena final : public c10::Allocator {
 public:
  Arena() {
    cap_ = size_t(1) << 30;
    if (const char* mb = std::getenv("SPARSECORE_CPU_ARENA_MB")) {
      char* end = nullptr;
      const long v = std::strtol(mb, &end, 10);
      if (end != mb && *end == '\0' && v >= 0 && v < (1L << 40))
        cap_ = size_t(v) << 20;
      else
        TORCH_WARN("sparsecore: SPARSECORE_CPU_ARENA_MB=", mb,
                   " is not a whole number of MiB >= 0; keeping at most 1024 MiB");
    }
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    Block* b = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        b = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
      }
    }
    if (!b) {
      void* p = std::aligned_alloc(64, bytes);
      if (!p && release() > 0) p = std::aligned_alloc(64, bytes);  // blocks of other sizes
      TORCH_CHECK(p, "sparsecore: out of memory allocating ", bytes, " bytes");
      b = new Block{p, bytes};
    }
    return {b->p, b, &Arena::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Frees every cached block; returns the bytes freed.
  int64_t release() {
    std::unordered_map<size_t, std::vector<Block*>> blocks;
    {
      const std::lock_guard<std::mutex> lock(mu_);
      blocks.swap(free_);
      cached_ = 0;
    }
    int64_t freed = 0;
    for (auto& [bytes, list] : blocks)
      for (Block* b : list) {
        std::free(b->p);
        freed += int64_t(b->bytes);
        delete b;
      }
    return freed;
  }

  int64_t cached() {
    const std::lock_guard<std::mutex> lock(mu_);
    return int64_t(cached_);
  }

  static Arena& get() {
    // never destroyed: tensors still alive at exit give their blocks back to it
    static Arena* arena = new Arena();
    return *arena;
  }

 private:
  static void give_back(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    Arena& a = get();
    {
      const std::lock_guard<std::mutex> lock(a.mu_);
      if (a.cached_ + b->bytes <= a.cap_) {
        a.free_[b->bytes].push_back(b);
        a.cached_ += b->bytes;
        return;
      }
    }
    std::free(b->p);
    delete b;
  }

  static constexpr size_t kPage = 4096;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<Block*>> free_;
  size_t cached_ = 0, cap_ = 0;
};

int64_t _arena_release_cpu() { return Arena::get().release(); }
int64_t _arena_cached_cpu() { return Arena::get().cached(); }

}  // namespace

at::Tensor arena_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "arena_empty: CPU tensors only");
  return at::detail::empty_generic(sizes, &Arena::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

// No tensor arguments: served from the CompositeExplicitAutograd kernel (as threads.cpp's).
TORCH_LIBRARY_IMPL(sparsecore, CompositeExplicitAutograd, m) {
  m.impl("_arena_release_cpu", &_arena_release_cpu);
  m.impl("_arena_cached_cpu", &_arena_cached_cpu);
}

}  // namespace sparsecore

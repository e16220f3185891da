// See Note [output cache] in output_cache.h.
#include "bindings/output_cache.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#if defined(_WIN32)
#include <malloc.h>
#else
#include <sys/mman.h>
#endif

namespace mlmath::bindings {

namespace py = pybind11;

namespace {

constexpr std::size_t kMinCachedBytes = std::size_t{1} << 20;
constexpr std::size_t kBlockAlignment = std::size_t{2} << 20;  // a huge page

void* allocate_block(std::size_t bytes) {
#if defined(_WIN32)
  void* p = _aligned_malloc(bytes, kBlockAlignment);
  if (p == nullptr) throw std::bad_alloc();
#else
  void* p = nullptr;
  if (posix_memalign(&p, kBlockAlignment, bytes) != 0) throw std::bad_alloc();
#if defined(MADV_HUGEPAGE)
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is harmless
#endif
#endif
  return p;
}

void free_block(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

std::size_t default_limit() {
  const char* env = std::getenv("MLMATH_NATIVE_OUTPUT_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    if (end != env && *end == '\0') return static_cast<std::size_t>(mb) << 20;
  }
  return std::size_t{256} << 20;
}

// Idle blocks in the order they were given back, most recent first; a release that takes the
// total past the limit evicts the least recently released blocks (LRU by bytes), so sizes no
// longer in use age out instead of pinning the budget.  The list holds at most limit / 1 MiB
// blocks (256 by default): a linear search costs far less than the allocation it saves.
class OutputCache {
 public:
  void* acquire(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.begin(); it != idle_.end(); ++it) {
        if (it->bytes == bytes) {
          void* p = it->data;
          idle_.erase(it);
          cached_bytes_ -= bytes;
          ++hits_;
          return p;
        }
      }
      ++misses_;
    }
    return allocate_block(bytes);
  }

  void release(void* p, std::size_t bytes) {
    std::list<Idle> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        evicted.push_back({p, bytes});
      } else {
        idle_.push_front({p, bytes});
        cached_bytes_ += bytes;
        evict_to_limit(evicted);
      }
    }
    for (const Idle& b : evicted) free_block(b.data);  // outside the lock
  }

  void set_limit(std::size_t limit) {
    std::list<Idle> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      evict_to_limit(evicted);
    }
    for (const Idle& b : evicted) free_block(b.data);
  }

  py::dict info() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["limit_bytes"] = limit_;
    d["cached_bytes"] = cached_bytes_;
    d["cached_blocks"] = idle_.size();
    d["hits"] = hits_;
    d["misses"] = misses_;
    d["evictions"] = evictions_;
    return d;
  }

 private:
  struct Idle {
    void* data;
    std::size_t bytes;
  };

  // Moves the least recently released blocks into `evicted` until the rest fits the limit.
  void evict_to_limit(std::list<Idle>& evicted) {
    while (cached_bytes_ > limit_ && !idle_.empty()) {
      cached_bytes_ -= idle_.back().bytes;
      evicted.splice(evicted.end(), idle_, std::prev(idle_.end()));
      ++evictions_;
    }
  }

  std::mutex mutex_;
  std::list<Idle> idle_;  // most recently released first
  std::size_t cached_bytes_ = 0;
  std::size_t limit_ = default_limit();
  std::uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

// Never destroyed: blocks may be given back by arrays that outlive module teardown.
OutputCache& cache() {
  static OutputCache* instance = new OutputCache();
  return *instance;
}

struct Block {
  void* data;
  std::size_t bytes;
};

}  // namespace

py::array new_output(const py::dtype& dtype, const std::vector<py::ssize_t>& shape) {
  std::size_t count = 1;
  for (py::ssize_t d : shape) count *= static_cast<std::size_t>(d);
  const std::size_t bytes = count * static_cast<std::size_t>(dtype.itemsize());
  if (bytes < kMinCachedBytes) return py::array(dtype, shape);
  Block* block = new Block{cache().acquire(bytes), bytes};
  py::capsule owner(block, [](void* b) {
    Block* blk = static_cast<Block*>(b);
    cache().release(blk->data, blk->bytes);
    delete blk;
  });
  return py::array(dtype, shape, {}, block->data, owner);
}

void bind_output_cache(py::module_& m) {
  m.def(
      "empty",
      [](const std::vector<py::ssize_t>& shape, const py::dtype& dtype) {
        // the byte count must fit in a py::ssize_t (an overflowing product would allocate a
        // small block for a huge shape)
        py::ssize_t bytes = dtype.itemsize();
        for (py::ssize_t d : shape) {
          if (d < 0) throw std::invalid_argument("empty: negative dimension");
          if (d > 0 && bytes > std::numeric_limits<py::ssize_t>::max() / d) {
            throw std::length_error("empty: the array would be too large to address");
          }
          bytes = d == 0 ? 0 : bytes * d;
        }
        return new_output(dtype, shape);
      },
      py::arg("shape"), py::arg("dtype"),
      "An uninitialised C-contiguous output array (large ones come from the output cache)");
  m.def(
      "set_output_cache_limit", [](std::size_t bytes) { cache().set_limit(bytes); },
      py::arg("bytes"));
  m.def("output_cache_info", []() { return cache().info(); });
}

}  // namespace mlmath::bindings

// See Note [output cache] in output_cache.h.
#include "bindings/output_cache.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <limits>
#include <map>
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

class OutputCache {
 public:
  void* acquire(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_bytes_ -= bytes;
        ++hits_;
        return p;
      }
      ++misses_;
    }
    return allocate_block(bytes);
  }

  void release(void* p, std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_) {
        free_.emplace(bytes, p);
        cached_bytes_ += bytes;
        return;
      }
    }
    free_block(p);
  }

  void set_limit(std::size_t limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = limit;
    // Drop the largest blocks first until the rest fits.
    while (cached_bytes_ > limit_ && !free_.empty()) {
      auto last = std::prev(free_.end());
      cached_bytes_ -= last->first;
      free_block(last->second);
      free_.erase(last);
    }
  }

  py::dict info() {
    std::lock_guard<std::mutex> lock(mutex_);
    py::dict d;
    d["limit_bytes"] = limit_;
    d["cached_bytes"] = cached_bytes_;
    d["cached_blocks"] = free_.size();
    d["hits"] = hits_;
    d["misses"] = misses_;
    return d;
  }

 private:
  std::mutex mutex_;
  std::multimap<std::size_t, void*> free_;  // byte size -> idle block
  std::size_t cached_bytes_ = 0;
  std::size_t limit_ = default_limit();
  std::uint64_t hits_ = 0, misses_ = 0;
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

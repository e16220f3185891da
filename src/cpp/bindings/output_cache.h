// New output arrays for the Python API, with a bounded cache of large blocks.
//
// Note [output cache]
// A large array that a kernel writes into fresh memory pays for the OS zeroing every new page
// on first touch: 64 MB cost about 3 ms on the project machines, as long as a memory-bound
// softmax over the same data.  Like PyTorch's CUDA caching allocator, outputs of 1 MiB or more
// come from blocks that earlier outputs of the same byte size gave back when their last NumPy
// reference died, so a loop that calls a kernel and drops the result reuses warm pages.
// Blocks are 2 MiB aligned and advised for transparent huge pages (as NumPy does).  At most
// `limit` bytes are kept (default 256 MiB, MLMATH_NATIVE_OUTPUT_CACHE_MB, or
// set_output_cache_limit; 0 turns the cache off), least recently released blocks evicted first
// (LRU by bytes); a block larger than the limit is freed at once.  Smaller outputs come from
// NumPy.
#pragma once

#include <pybind11/numpy.h>

#include <cstddef>
#include <vector>

namespace mlmath::bindings {

// An uninitialised C-contiguous array of `shape` and `dtype` (cached when it is large).
pybind11::array new_output(const pybind11::dtype& dtype,
                           const std::vector<pybind11::ssize_t>& shape);

void bind_output_cache(pybind11::module_& m);

}  // namespace mlmath::bindings

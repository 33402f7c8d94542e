// A cache of the memory behind the inference kernels' outputs (activations).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sparsecore {

// at::empty(sizes, options) for a CPU tensor whose memory comes from the arena: a block freed
// by a tensor goes back to a list of blocks of its size, and the next output of that size takes
// it. Without it the outputs come from glibc, which, depending on what the process allocated
// before, maps big blocks afresh and returns them to the OS (or trims its heap) on every call:
// in some processes and not in others a whole model page-faulted its activations in on each
// forward, and its speed changed from one process to the next. Blocks are 64-byte aligned.
at::Tensor arena_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace sparsecore

// How much work the CPU kernels give each OpenMP thread before they start another one.
//
// Every kernel family sizes its team from the work of the call (waking threads for a tiny
// op costs more than the op), each with its own default. Tests lower the threshold with the
// internal op _set_min_work_per_thread so that small, fast shapes still run every threaded
// path (row splits, per-thread accumulators and their reduction) on several threads.
#pragma once

#include <cstdint>

namespace sparsecore {

// `fallback` (the family's own default), unless _set_min_work_per_thread set a positive
// override.
int64_t min_work_per_thread(int64_t fallback);

}  // namespace sparsecore

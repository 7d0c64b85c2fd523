// The schedules of the CPU fused step (cpu_fused_impl.h) and how one is chosen (cpu_schedule.cpp).
#pragma once

#include <cstdint>

#include "demem_kernels.h"

namespace demem {

// "rows": G read once (a group of rows, then its accumulation from cache); "columns": G read twice
// (norms, then column chunks); "mv": the norms of "columns", then torch's matrix-vector product
// (at::mm, what `coeff @ G` runs) for coeffᵀG (float32 and float64 gradients only; otherwise "columns" runs).
enum class CpuSchedule : int { kRows = 0, kColumns = 1, kMv = 2 };

const char* schedule_name(CpuSchedule s);

// The most rows a norm sweep reads side by side (memory streams at once).
constexpr int kMaxNormRows = 16;

// How a step runs: its schedule and the rows its norm sweeps read side by side (1..kMaxNormRows;
// "rows": at most, where fewer fit in cache). The norms do not depend on it, only the speed: an Intel
// Xeon core needs many streams to reach its bandwidth, a Zen 4 core streams fastest with few.
struct CpuPlan {
  CpuSchedule schedule;
  int norm_rows;
};

// The two passes of "columns", run alone by demem::cpu_fused_pass (cpu_passes.cpp).
enum class CpuPass : int { kNorms = 0, kAccumulate = 1 };
void run_pass_cpu(const FusedCpuArgs& args, CpuPass pass, int norm_rows);

// The fused step with a given plan, in the build this CPU runs (cpu_kernels.cpp).
void run_fused_cpu(const FusedCpuArgs& args, const CpuPlan& plan);

// The norm pass's rows side by side for a step on args' shape on this thread count: forced
// (DEMEM_CPU_NORM_ROWS), or measured on its first call and cached (cpu_schedule.cpp).
int cpu_norm_rows(const FusedCpuArgs& args);

// Bytes of cache one of `threads` threads may fill with rows and an accumulator (cpu_kernels.cpp).
int64_t cpu_cache_budget(int64_t threads);

// grad[P] = coeffᵀ·G with at::mm (float32 or float64 G; coeff in G's dtype) (cpu_schedule.cpp).
void cpu_gemv(const FusedCpuArgs& args, const void* coeff);

}  // namespace demem

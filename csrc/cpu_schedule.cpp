// Which schedule the CPU fused step runs (cpu_schedule.h): measured, not guessed. The first call of
// a (dtype, B, P, threads) runs every candidate schedule in turn, a few rounds, and keeps the fastest
// for the process; DEMEM_CPU_SCHEDULE=rows|columns|mv forces one (auto or unset: calibrate). The
// op demem::cpu_fused_schedule(grads) names the schedule a call on `grads` runs now.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_schedule.h"

namespace demem {

namespace {

constexpr double kMinCalibrationSeconds = 0.05;  // tiny steps get more rounds, up to kMaxRounds
constexpr int kMinRounds = 3;
constexpr int kMaxRounds = 20;

std::optional<CpuSchedule> forced_schedule() {
  const char* v = std::getenv("DEMEM_CPU_SCHEDULE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return std::nullopt;
  for (const CpuSchedule s : {CpuSchedule::kRows, CpuSchedule::kColumns, CpuSchedule::kMv}) {
    if (std::strcmp(v, schedule_name(s)) == 0) return s;
  }
  TORCH_CHECK(false, "DEMEM_CPU_SCHEDULE must be auto, rows, columns or mv; got '", v, "'");
}

bool mv_supported(GradKind kind) { return kind == GradKind::kFloat || kind == GradKind::kDouble; }

int64_t item_bytes(GradKind kind) {
  switch (kind) {
    case GradKind::kHalf:
    case GradKind::kBFloat16:
      return 2;
    case GradKind::kFloat:
      return 4;
    case GradKind::kDouble:
      return 8;
  }
  return 4;
}

using Key = std::tuple<int, int64_t, int64_t, int>;  // kind, B, P, threads

Key key_of(GradKind kind, int64_t rows, int64_t cols) {
  return {static_cast<int>(kind), rows, cols, at::get_num_threads()};
}

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
std::map<Key, CpuSchedule>& chosen() {
  static std::map<Key, CpuSchedule> m;
  return m;
}

// "columns" always; "mv" for float32/float64; "rows" when a row and its accumulator fit in a
// thread's share of the cache (cpu_cache_budget; otherwise the rows cannot be re-read from cache).
std::vector<CpuSchedule> candidates(const FusedCpuArgs& a) {
  std::vector<CpuSchedule> c{CpuSchedule::kColumns};
  if (mv_supported(a.kind)) c.push_back(CpuSchedule::kMv);
  const int64_t acc_bytes = a.cols * (a.kind == GradKind::kDouble ? 8 : 4);
  const int64_t threads = std::clamp<int64_t>(at::get_num_threads(), 1, a.rows);
  if (a.cols * item_bytes(a.kind) + acc_bytes <= cpu_cache_budget(threads)) c.push_back(CpuSchedule::kRows);
  return c;
}

double seconds(const FusedCpuArgs& a, CpuSchedule s) {
  const auto t0 = std::chrono::steady_clock::now();
  run_fused_cpu(a, s);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rounds of every candidate in turn (machine noise hits them alike); the lowest minimum wins.
CpuSchedule calibrate(const FusedCpuArgs& a) {
  const std::vector<CpuSchedule> c = candidates(a);
  if (c.size() == 1 || a.rows == 0 || a.cols == 0) return c.front();
  std::vector<double> best(c.size(), std::numeric_limits<double>::infinity());
  int rounds = kMinRounds;
  for (int round = 0; round < rounds; ++round) {
    double total = 0.0;
    for (size_t i = 0; i < c.size(); ++i) {
      const double t = seconds(a, c[i]);
      best[i] = std::min(best[i], t);
      total += t;
    }
    if (round == 0 && total > 0.0) {
      rounds = std::clamp(static_cast<int>(kMinCalibrationSeconds / total), kMinRounds, kMaxRounds);
    }
  }
  return c[std::min_element(best.begin(), best.end()) - best.begin()];
}

CpuSchedule schedule_for(const FusedCpuArgs& a) {
  if (const auto forced = forced_schedule()) return *forced;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const Key key = key_of(a.kind, a.rows, a.cols);
  const auto it = chosen().find(key);
  if (it != chosen().end()) return it->second;
  const CpuSchedule s = calibrate(a);
  chosen().emplace(key, s);
  return s;
}

GradKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return GradKind::kHalf;
    case at::kBFloat16:
      return GradKind::kBFloat16;
    case at::kDouble:
      return GradKind::kDouble;
    default:
      return GradKind::kFloat;
  }
}

// The schedule a fused step on `grads` (on this thread count) runs: forced, calibrated, or
// "uncalibrated" before the first call of that shape.
std::string cpu_fused_schedule(const at::Tensor& grads) {
  TORCH_CHECK(grads.dim() == 2, "demem::cpu_fused_schedule: grads must be [B, P], got ", grads.sizes());
  if (const auto forced = forced_schedule()) return schedule_name(*forced);
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto it = chosen().find(key_of(kind_of(grads.scalar_type()), grads.size(0), grads.size(1)));
  return it == chosen().end() ? "uncalibrated" : schedule_name(it->second);
}

}  // namespace

const char* schedule_name(CpuSchedule s) {
  switch (s) {
    case CpuSchedule::kRows:
      return "rows";
    case CpuSchedule::kColumns:
      return "columns";
    case CpuSchedule::kMv:
      return "mv";
  }
  return "?";
}

void cpu_gemv(const FusedCpuArgs& a, const void* coeff) {
  TORCH_CHECK(mv_supported(a.kind), "cpu_gemv: float32 or float64 gradients only");
  const auto opts = at::TensorOptions().dtype(a.kind == GradKind::kDouble ? at::kDouble : at::kFloat);
  const at::Tensor G = at::from_blob(const_cast<void*>(a.grads), {a.rows, a.cols}, opts);
  const at::Tensor c = at::from_blob(const_cast<void*>(coeff), {1, a.rows}, opts);
  at::Tensor out = at::from_blob(a.grad, {1, a.cols}, opts);
  at::mm_out(out, c, G);  // what `coeff @ G` runs
}

void fused_step_cpu_kernel(const FusedCpuArgs& args) { run_fused_cpu(args, schedule_for(args)); }

}  // namespace demem

TORCH_LIBRARY_FRAGMENT(demem, m) {
  m.def("cpu_fused_schedule(Tensor grads) -> str", &demem::cpu_fused_schedule);
}

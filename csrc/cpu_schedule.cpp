// Which plan the CPU fused step runs (cpu_schedule.h): measured, not guessed. The first call of a
// (dtype, B, P, threads) first times the norm pass with each candidate number of rows read side by
// side (kNormRowCandidates), then every candidate schedule with the fastest, in interleaved rounds
// after one untimed warm-up call each, and keeps the one with the lowest median for the process.
// DEMEM_CPU_SCHEDULE=rows|columns|mv forces a schedule and DEMEM_CPU_NORM_ROWS=1..16 the rows side by
// side (auto or unset: calibrate). The ops demem::cpu_fused_schedule(grads) and
// demem::cpu_fused_norm_rows(grads) name what a call on `grads` runs now.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
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

constexpr double kMinCalibrationSeconds = 0.1;  // tiny steps get more rounds, up to kMaxRounds
constexpr int kMinRounds = 5;
constexpr int kMaxRounds = 21;
// The norm pass's candidates: few streams (fastest on a Zen 4) and many (on an Intel Xeon, where one
// core needs them to reach its bandwidth); docs/benchmarks.md.
constexpr int kNormRowCandidates[] = {4, kMaxNormRows};

std::optional<CpuSchedule> forced_schedule() {
  const char* v = std::getenv("DEMEM_CPU_SCHEDULE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return std::nullopt;
  for (const CpuSchedule s : {CpuSchedule::kRows, CpuSchedule::kColumns, CpuSchedule::kMv}) {
    if (std::strcmp(v, schedule_name(s)) == 0) return s;
  }
  TORCH_CHECK(false, "DEMEM_CPU_SCHEDULE must be auto, rows, columns or mv; got '", v, "'");
}

std::optional<int> forced_norm_rows() {
  const char* v = std::getenv("DEMEM_CPU_NORM_ROWS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return std::nullopt;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  TORCH_CHECK(*end == '\0' && n >= 1 && n <= kMaxNormRows, "DEMEM_CPU_NORM_ROWS must be auto or an integer in 1..",
              kMaxNormRows, "; got '", v, "'");
  return static_cast<int>(n);
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
std::map<Key, CpuSchedule>& chosen_schedules() {
  static std::map<Key, CpuSchedule> m;
  return m;
}
std::map<Key, int>& chosen_norm_rows() {
  static std::map<Key, int> m;
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

template <typename Run>
double seconds(const Run& run) {
  const auto t0 = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// The index of the fastest of `runs`: one untimed warm-up call each (first touches, page faults),
// then rounds of every run in turn (machine noise hits them alike); the lowest median wins (a run
// that is fast only now and then does not).
template <typename Run>
size_t fastest(const std::vector<Run>& runs) {
  for (const Run& run : runs) run();
  std::vector<std::vector<double>> times(runs.size());
  int rounds = kMinRounds;
  for (int round = 0; round < rounds; ++round) {
    double total = 0.0;
    for (size_t i = 0; i < runs.size(); ++i) {
      times[i].push_back(seconds(runs[i]));
      total += times[i].back();
    }
    if (round == 0 && total > 0.0) {
      rounds = std::clamp(static_cast<int>(kMinCalibrationSeconds / total), kMinRounds, kMaxRounds);
    }
  }
  std::vector<double> medians;
  for (std::vector<double>& t : times) {
    std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
    medians.push_back(t[t.size() / 2]);
  }
  return static_cast<size_t>(std::min_element(medians.begin(), medians.end()) - medians.begin());
}

// Caller holds cache_mutex(). The norm rows with the fastest norm pass (its normals included).
int norm_rows_locked(const FusedCpuArgs& a) {
  if (const auto forced = forced_norm_rows()) return *forced;
  const Key key = key_of(a.kind, a.rows, a.cols);
  const auto it = chosen_norm_rows().find(key);
  if (it != chosen_norm_rows().end()) return it->second;
  int rows = kMaxNormRows;
  if (a.rows > kNormRowCandidates[0] && a.cols > 0) {  // with fewer rows every candidate reads the same
    std::vector<std::function<void()>> runs;
    for (const int n : kNormRowCandidates) runs.emplace_back([&a, n] { run_pass_cpu(a, CpuPass::kNorms, n); });
    rows = kNormRowCandidates[fastest(runs)];
  }
  chosen_norm_rows().emplace(key, rows);
  return rows;
}

CpuPlan plan_for(const FusedCpuArgs& a) {
  const auto forced = forced_schedule();
  std::lock_guard<std::mutex> lock(cache_mutex());
  const int norm_rows = norm_rows_locked(a);
  if (forced) return {*forced, norm_rows};
  const Key key = key_of(a.kind, a.rows, a.cols);
  const auto it = chosen_schedules().find(key);
  if (it != chosen_schedules().end()) return {it->second, norm_rows};
  const std::vector<CpuSchedule> c = candidates(a);
  CpuSchedule s = c.front();
  if (c.size() > 1 && a.rows > 0 && a.cols > 0) {
    std::vector<std::function<void()>> runs;
    for (const CpuSchedule candidate : c) {
      runs.emplace_back([&a, candidate, norm_rows] { run_fused_cpu(a, {candidate, norm_rows}); });
    }
    s = c[fastest(runs)];
  }
  chosen_schedules().emplace(key, s);
  return {s, norm_rows};
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

Key key_of(const at::Tensor& grads) {
  TORCH_CHECK(grads.dim() == 2, "demem::cpu_fused_schedule: grads must be [B, P], got ", grads.sizes());
  return key_of(kind_of(grads.scalar_type()), grads.size(0), grads.size(1));
}

// The schedule a fused step on `grads` (on this thread count) runs: forced, calibrated, or
// "uncalibrated" before the first call of that shape.
std::string cpu_fused_schedule(const at::Tensor& grads) {
  const Key key = key_of(grads);
  if (const auto forced = forced_schedule()) return schedule_name(*forced);
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto it = chosen_schedules().find(key);
  return it == chosen_schedules().end() ? "uncalibrated" : schedule_name(it->second);
}

// The rows its norm sweeps read side by side ("rows": at most, where fewer fit in cache): forced,
// calibrated, or 0 before the first call of that shape.
int64_t cpu_fused_norm_rows(const at::Tensor& grads) {
  const Key key = key_of(grads);
  if (const auto forced = forced_norm_rows()) return *forced;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto it = chosen_norm_rows().find(key);
  return it == chosen_norm_rows().end() ? 0 : it->second;
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

int cpu_norm_rows(const FusedCpuArgs& args) {
  std::lock_guard<std::mutex> lock(cache_mutex());
  return norm_rows_locked(args);
}

void fused_step_cpu_kernel(const FusedCpuArgs& args) { run_fused_cpu(args, plan_for(args)); }

}  // namespace demem

TORCH_LIBRARY_FRAGMENT(demem, m) {
  m.def("cpu_fused_schedule(Tensor grads) -> str", &demem::cpu_fused_schedule);
  m.def("cpu_fused_norm_rows(Tensor grads) -> int", &demem::cpu_fused_norm_rows);
}

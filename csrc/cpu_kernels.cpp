// CPU kernels of demem_ext, default build flags: the fused step and the Philox normals
// (cpu_fused_impl.h), the dispatch between them and their AVX2 and AVX-512 builds (cpu_kernels_avx2.cpp,
// cpu_kernels_avx512.cpp), and the cache budget that sizes the "rows" schedule's groups (and decides
// whether it is a candidate).
#define DEMEM_FUSED_ENTRY fused_step_cpu_default
#define DEMEM_NORMALS_ENTRY philox_normals_cpu_default
#define DEMEM_PASS_ENTRY pass_cpu_default
#include "cpu_fused_impl.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace demem {

// Defined in cpu_kernels_avx2.cpp and cpu_kernels_avx512.cpp on x86-64 with GCC/Clang.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEMEM_HAVE_AVX2_BUILD 1
void fused_step_cpu_avx2(const FusedCpuArgs& args, const CpuPlan& plan);
void philox_normals_cpu_avx2(float* out, int64_t n, uint64_t seed, uint64_t block0);
void pass_cpu_avx2(const FusedCpuArgs& args, CpuPass pass, int norm_rows);
void fused_step_cpu_avx512(const FusedCpuArgs& args, const CpuPlan& plan);
void philox_normals_cpu_avx512(float* out, int64_t n, uint64_t seed, uint64_t block0);
void pass_cpu_avx512(const FusedCpuArgs& args, CpuPass pass, int norm_rows);
#endif

namespace {

// The size of cpu0's highest-level cache in Linux's sysfs ("32768K"), 0 when it does not say. A VM may
// pass the host's CPUID through, so that glibc's sysconf reports the whole socket's L3 (320 MB on a
// Zen 4 VM whose cores share 32 MB); sysfs gives the cache the cores actually share.
int64_t sysfs_last_level_cache_bytes() {
  int best_level = 0;
  int64_t bytes = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level"), size_file(dir + "size");
    int level = 0;
    std::string size;
    if (!(level_file >> level) || !(size_file >> size) || size.empty()) break;
    char* end = nullptr;
    int64_t value = std::strtoll(size.c_str(), &end, 10);
    if (*end == 'K') value <<= 10;
    if (*end == 'M') value <<= 20;
    if (level >= best_level && value > 0) best_level = level, bytes = value;
  }
  return bytes;
}

enum class Isa { kDefault, kAvx2, kAvx512 };

// The widest build this CPU runs; ATEN_CPU_CAPABILITY=default|avx2 (ATen's own switch) caps it.
Isa cpu_isa() {
#ifdef DEMEM_HAVE_AVX2_BUILD
  static const Isa isa = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");
    if (forced != nullptr && std::strcmp(forced, "default") == 0) return Isa::kDefault;
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
      return Isa::kDefault;
    }
    if (forced != nullptr && std::strcmp(forced, "avx2") == 0) return Isa::kAvx2;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : Isa::kAvx2;
  }();
  return isa;
#else
  return Isa::kDefault;
#endif
}

}  // namespace

// A thread's share of 3/4 of the last-level cache (the rest for the OS, other processes, the
// noise). DEMEM_CPU_CACHE_BYTES, read at each call, overrides the total (0: "rows" is never a
// candidate of the calibration, cpu_schedule.cpp).
int64_t cpu_cache_budget(int64_t threads) {
  int64_t total = cpu_last_level_cache_bytes() / 4 * 3;
  if (const char* forced = std::getenv("DEMEM_CPU_CACHE_BYTES"); forced != nullptr && *forced != '\0') {
    total = std::strtoll(forced, nullptr, 10);
  }
  return total / std::max<int64_t>(1, threads);
}

// The last-level cache in bytes (sysfs, else glibc's sysconf; 1 MiB when the system does not say).
int64_t cpu_last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const int64_t b = sysfs_last_level_cache_bytes(); b > 0) return b;
#if defined(_SC_LEVEL3_CACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
    for (const int name : {_SC_LEVEL3_CACHE_SIZE, _SC_LEVEL2_CACHE_SIZE}) {
      const long v = sysconf(name);
      if (v > 0) return static_cast<int64_t>(v);
    }
#endif
    return static_cast<int64_t>(1) << 20;
  }();
  return bytes;
}

const char* cpu_kernel_capability() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kDefault:
      break;
  }
  return "default";
}

void run_fused_cpu(const FusedCpuArgs& args, const CpuPlan& plan) {
#ifdef DEMEM_HAVE_AVX2_BUILD
  if (cpu_isa() == Isa::kAvx512) return fused_step_cpu_avx512(args, plan);
  if (cpu_isa() == Isa::kAvx2) return fused_step_cpu_avx2(args, plan);
#endif
  fused_step_cpu_default(args, plan);
}

void run_pass_cpu(const FusedCpuArgs& args, CpuPass pass, int norm_rows) {
#ifdef DEMEM_HAVE_AVX2_BUILD
  if (cpu_isa() == Isa::kAvx512) return pass_cpu_avx512(args, pass, norm_rows);
  if (cpu_isa() == Isa::kAvx2) return pass_cpu_avx2(args, pass, norm_rows);
#endif
  pass_cpu_default(args, pass, norm_rows);
}

void philox_normal_cpu_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  constexpr int64_t kPiece = 4096;  // elements per task (multiple of 4)
  [[maybe_unused]] const Isa isa = cpu_isa();
  at::parallel_for(0, divup(n, kPiece), 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t j0 = p * kPiece, m = std::min(kPiece, n - j0);
      const uint64_t block0 = offset + static_cast<uint64_t>(j0 / 4);
#ifdef DEMEM_HAVE_AVX2_BUILD
      if (isa == Isa::kAvx512) {
        philox_normals_cpu_avx512(out + j0, m, seed, block0);
        continue;
      }
      if (isa == Isa::kAvx2) {
        philox_normals_cpu_avx2(out + j0, m, seed, block0);
        continue;
      }
#endif
      philox_normals_cpu_default(out + j0, m, seed, block0);
    }
  });
}

}  // namespace demem

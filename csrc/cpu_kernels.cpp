// CPU kernels of demem_ext, default build flags: the fused step (cpu_fused_impl.h), the dispatch
// between it and the AVX2 build (cpu_kernels_avx2.cpp), the noise/finish step and the Philox
// generator. The Philox and Box–Muller arithmetic is compiled only here, once, without FMA
// contraction, so both fused builds add exactly the same noise.
#define DEMEM_FUSED_ENTRY fused_step_cpu_default
#include "cpu_fused_impl.h"

#include <cstdlib>
#include <cstring>

namespace demem {

// Defined in cpu_kernels_avx2.cpp on x86-64 with GCC/Clang.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEMEM_HAVE_AVX2_BUILD 1
void fused_step_cpu_avx2(const FusedCpuArgs& args);
#endif

namespace {

template <typename acc_t>
void finish_columns_impl(acc_t* out, int64_t col0, int64_t n, double noise_std, uint64_t seed, uint64_t offset,
                         double denom) {
  const acc_t d = static_cast<acc_t>(denom);
  if (noise_std > 0) {
    const acc_t s = static_cast<acc_t>(noise_std);
    const uint64_t block0 = offset + static_cast<uint64_t>(col0 / 4);
    for (int64_t b = 0; 4 * b < n; ++b) {
      float z[4];
      philox_normal4(block0 + static_cast<uint64_t>(b), seed, z);
      const int64_t m = std::min<int64_t>(4, n - 4 * b);
      for (int64_t l = 0; l < m; ++l) {
        const acc_t noise = s * static_cast<acc_t>(z[l]);
        out[4 * b + l] = (out[4 * b + l] + noise) / d;
      }
    }
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = out[i] / d;
  }
}

bool use_avx2() {
#ifdef DEMEM_HAVE_AVX2_BUILD
  static const bool ok = [] {
    const char* forced = std::getenv("ATEN_CPU_CAPABILITY");  // same switch as ATen's own kernels
    if (forced != nullptr && std::strcmp(forced, "default") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

void finish_columns(float* out, int64_t col0, int64_t n, double noise_std, uint64_t seed, uint64_t offset,
                    double denom) {
  finish_columns_impl(out, col0, n, noise_std, seed, offset, denom);
}
void finish_columns(double* out, int64_t col0, int64_t n, double noise_std, uint64_t seed, uint64_t offset,
                    double denom) {
  finish_columns_impl(out, col0, n, noise_std, seed, offset, denom);
}

const char* cpu_kernel_capability() { return use_avx2() ? "avx2" : "default"; }

void fused_step_cpu_kernel(const FusedCpuArgs& args) {
#ifdef DEMEM_HAVE_AVX2_BUILD
  if (use_avx2()) return fused_step_cpu_avx2(args);
#endif
  fused_step_cpu_default(args);
}

void philox_normal_cpu_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t blocks = divup(n, 4);
  at::parallel_for(0, blocks, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float z[4];
      philox_normal4(offset + static_cast<uint64_t>(b), seed, z);
      const int64_t j0 = 4 * b;
      const int64_t m = std::min<int64_t>(4, n - j0);
      for (int64_t l = 0; l < m; ++l) out[j0 + l] = z[l];
    }
  });
}

}  // namespace demem

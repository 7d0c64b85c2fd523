// Declarations shared between the translation units of demem_ext._C.
//   demem.cpp        op schemas, argument checks, CPU/Composite registrations, pybind11 module
//   cpu_kernels.cpp  the CPU kernels on raw pointers (parallel, at::vec::Vectorized), default ISA
//   cpu_kernels_avx2.cpp, cpu_kernels_avx512.cpp  the same fused kernel and Philox normals (cpu_fused_impl.h)
//                    built for AVX2/FMA/F16C and for AVX-512 (both through cpu_kernels_isa.h)
//   cuda_kernels.cu  the CUDA implementations (only with DEMEM_WITH_CUDA)
#pragma once

#include <cstdint>

#include "demem_common.h"

namespace demem {

enum class GradKind : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Arguments of the CPU fused kernel. The per-sample weights and risks are already computed (they
// do not depend on the gradients). Outputs are in the accumulation dtype: double for kDouble
// gradients, float otherwise.
struct FusedCpuArgs {
  const void* grads;  // [rows, cols], contiguous
  GradKind kind;
  int64_t rows;
  int64_t cols;
  const double* weights;  // [rows] w_i (float64, rounded as the reference rounds them)
  const double* risk;     // [rows] r_i
  bool clip;
  double max_norm;
  int scope;         // ClipScope
  double noise_std;  // σ·C (σ without clipping); 0 disables the noise
  uint64_t seed;
  uint64_t offset;
  double denom;
  void* grad;   // [cols] out
  void* norms;  // [rows] out
  void* coeff;  // [rows] out
};

void fused_step_cpu_kernel(const FusedCpuArgs& args);

// "avx2" or "default": the build of the fused CPU kernel this CPU runs.
const char* cpu_kernel_capability();

// The last-level cache in bytes that the CPU schedule's cache budget starts from (cpu_kernels.cpp).
int64_t cpu_last_level_cache_bytes();

// n float32 normals of the Philox stream (seed, offset), in parallel.
void philox_normal_cpu_kernel(float* out, int64_t n, uint64_t seed, uint64_t offset);

}  // namespace demem

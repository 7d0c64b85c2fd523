// The CPU fused step and Philox normals built for AVX-512 F/BW/VL/DQ with AVX2 + FMA + F16C
// (cpu_kernels_isa.h; ATen's 512-bit vectors, sixteen-lane Philox noise: philox_avx512.h), used at
// run time on CPUs that have them (fused_step_cpu_kernel in cpu_kernels.cpp).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEMEM_ISA_AVX512 1
#include "cpu_kernels_isa.h"
#endif

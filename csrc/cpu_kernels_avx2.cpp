// The CPU fused step and Philox normals built for AVX2 + FMA + F16C (cpu_kernels_isa.h), used at run
// time on CPUs that have them and no AVX-512 (fused_step_cpu_kernel in cpu_kernels.cpp).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEMEM_ISA_AVX512 0
#include "cpu_kernels_isa.h"
#endif

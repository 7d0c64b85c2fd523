// The CPU fused step and Philox normals (cpu_fused_impl.h) built for AVX2 + FMA + F16C, used at run time on CPUs that
// have them (see fused_step_cpu_kernel in cpu_kernels.cpp). setup.py compiles every .cpp with the
// same portable flags, so the ISA is enabled here with a target pragma and ATen's vector headers
// are switched to their AVX2 implementation (namespace at::vec::AVX2, as ATen's own AVX2 kernels).
// Every other header is included first, without the pragma, so that no inline function shared
// with other translation units is compiled for AVX2 (and no static initializer uses it).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_schedule.h"
#include "demem_common.h"
#include "demem_kernels.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"  // lambda-to-pointer thunks in ATen headers (unused here)
#endif

// sleef.h (included by ATen's AVX2 vectors) declares its 256-bit functions only when the ISA macros
// are set by -mavx/-mavx2; they are declared here under the pragma, then the macros are removed.
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#define DEMEM_UNDEF_ISA_MACROS
#endif
#include <sleef.h>
#ifdef DEMEM_UNDEF_ISA_MACROS
#undef __AVX__
#undef __AVX2__
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define DEMEM_FUSED_ENTRY fused_step_cpu_avx2
#define DEMEM_NORMALS_ENTRY philox_normals_cpu_avx2
#define DEMEM_PASS_ENTRY pass_cpu_avx2
#include "cpu_fused_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif

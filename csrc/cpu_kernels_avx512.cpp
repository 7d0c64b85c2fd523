// The CPU fused step and Philox normals (cpu_fused_impl.h) built for AVX-512 (F, BW, VL, DQ) with AVX2 + FMA +
// F16C, used at run time on CPUs that have them (cpu_kernels.cpp; the same build as cpu_kernels_avx2.cpp
// with ATen's 512-bit vectors, namespace at::vec::AVX512, as ATen's own AVX512 kernels; the Philox noise
// keeps its eight-lane AVX2 path).
// Every other header is included first, without the pragma, so that no inline function shared
// with other translation units is compiled for AVX-512 (and no static initializer uses it).
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
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#pragma GCC diagnostic ignored "-Wpsabi"  // lambda-to-pointer thunks in ATen headers (unused here)
#endif

// sleef.h declares its 256- and 512-bit functions only when the ISA macros are set by -mavx2/-mavx512f;
// they are declared here under the pragma, then the macros are removed.
#if !defined(__AVX512F__)
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#define DEMEM_UNDEF_ISA_MACROS
#endif
#include <sleef.h>
#ifdef DEMEM_UNDEF_ISA_MACROS
#undef __AVX__
#undef __AVX2__
#undef __AVX512F__
#endif

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define DEMEM_FUSED_ENTRY fused_step_cpu_avx512
#define DEMEM_NORMALS_ENTRY philox_normals_cpu_avx512
#define DEMEM_PASS_ENTRY pass_cpu_avx512
#include "cpu_fused_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif

// One x86-64 vector build of the CPU fused step and Philox normals (cpu_fused_impl.h), included by
// cpu_kernels_avx2.cpp and cpu_kernels_avx512.cpp, which define DEMEM_ISA_AVX512 (0 or 1) first;
// cpu_kernels.cpp chooses between the builds at run time.
//
// setup.py compiles every .cpp with the same portable flags, so the ISA is enabled here with a target
// pragma and ATen's vector headers are switched to their AVX2 or AVX512 implementation (namespace
// at::vec::AVX2 / at::vec::AVX512, as ATen's own kernels). Every other header is included first,
// without the pragma, so that no inline function shared with other translation units is compiled for
// the wider ISA (and no static initializer uses it).
#pragma once

#if !defined(DEMEM_ISA_AVX512)
#error "define DEMEM_ISA_AVX512 (0: AVX2 + FMA + F16C, 1: with AVX-512 F/BW/VL/DQ) before including cpu_kernels_isa.h"
#endif

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

#if DEMEM_ISA_AVX512
#define DEMEM_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#else
#define DEMEM_ISA_TARGET "avx2,fma,f16c"
#endif
#define DEMEM_PRAGMA(text) _Pragma(#text)
#define DEMEM_EXPANDED_PRAGMA(text) DEMEM_PRAGMA(text)

#if defined(__clang__)
DEMEM_EXPANDED_PRAGMA(clang attribute push(__attribute__((target(DEMEM_ISA_TARGET))), apply_to = function))
#else
#pragma GCC push_options
DEMEM_EXPANDED_PRAGMA(GCC target(DEMEM_ISA_TARGET))
#pragma GCC diagnostic ignored "-Wpsabi"  // lambda-to-pointer thunks in ATen headers (unused here)
#endif

// sleef.h (included by ATen's vectors) declares its 256- and 512-bit functions only when the ISA macros
// are set by -mavx2 / -mavx512f; they are declared here under the pragma, then the macros are removed.
#if !defined(__AVX2__)
#define __AVX__ 1
#define __AVX2__ 1
#define DEMEM_UNDEF_AVX2_MACROS
#endif
#if DEMEM_ISA_AVX512 && !defined(__AVX512F__)
#define __AVX512F__ 1
#define DEMEM_UNDEF_AVX512_MACRO
#endif
#include <sleef.h>
#ifdef DEMEM_UNDEF_AVX2_MACROS
#undef __AVX__
#undef __AVX2__
#endif
#ifdef DEMEM_UNDEF_AVX512_MACRO
#undef __AVX512F__
#endif

#if DEMEM_ISA_AVX512
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define DEMEM_FUSED_ENTRY fused_step_cpu_avx512
#define DEMEM_NORMALS_ENTRY philox_normals_cpu_avx512
#define DEMEM_PASS_ENTRY pass_cpu_avx512
#else
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define DEMEM_FUSED_ENTRY fused_step_cpu_avx2
#define DEMEM_NORMALS_ENTRY philox_normals_cpu_avx2
#define DEMEM_PASS_ENTRY pass_cpu_avx2
#endif
#include "cpu_fused_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

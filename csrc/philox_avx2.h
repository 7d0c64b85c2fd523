// Philox4x32-10 and Box–Muller on eight counter blocks at once with AVX2 (lanes = blocks), the
// vector path of the CPU noise (cpu_fused_impl.h, AVX2 build) and of benchmarks/cpu_probe.cpp.
// Same stream as philox_normal4 (demem_common.h): the Philox words bit for bit, the normals to a few
// float32 ulps (SLEEF's 1-ulp logf/sincosf instead of the C library's). Include only where AVX2 and
// FMA are enabled (target pragma or -mavx2 -mfma), after sleef.h's AVX2 declarations are visible.
#pragma once

#include <immintrin.h>
#include <sleef.h>

#include <cstdint>

#include "demem_common.h"

namespace demem {

// hi and lo 32 bits of m·x in each of the eight 32-bit lanes (m broadcast).
inline __m256i mulhilo8(__m256i m, __m256i x, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);                        // lanes 0, 2, 4, 6 (64-bit products)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// The Philox uniform of each lane: float32(x)·2⁻³² + 2⁻³³, float32(x) rounded once as the scalar cast
// (the two 16-bit halves convert exactly; their sum rounds once).
inline __m256 uniform8(__m256i x) {
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(x, 16));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0xFFFF)));
  const __m256 f = _mm256_add_ps(_mm256_mul_ps(hi, _mm256_set1_ps(65536.0f)), lo);
  return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(2.3283064365386962890625e-10f)),
                       _mm256_set1_ps(1.16415321826934814453125e-10f));
}

// Philox4x32-10 of blocks block0 .. block0 + 7 at once: x[l] holds lane l of the eight blocks.
inline void philox8(uint64_t block0, uint64_t seed, __m256i x[4]) {
  alignas(32) uint32_t c0[8], c1[8];
  for (int b = 0; b < 8; ++b) {
    const uint64_t block = block0 + static_cast<uint64_t>(b);
    c0[b] = static_cast<uint32_t>(block);
    c1[b] = static_cast<uint32_t>(block >> 32);
  }
  __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c0));
  __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(c1));
  __m256i x2 = _mm256_setzero_si256(), x3 = _mm256_setzero_si256();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    __m256i lo0, lo1;
    const __m256i hi0 = mulhilo8(m0, x0, lo0);
    const __m256i hi1 = mulhilo8(m1, x2, lo1);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi1, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi0, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo1;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  x[0] = x0;
  x[1] = x1;
  x[2] = x2;
  x[3] = x3;
}

// Stores normals z_l[b] (word l of block b, eight blocks) in stream order: out[4·b + l].
inline void store_block_major8(__m256 z0, __m256 z1, __m256 z2, __m256 z3, float* out) {
  const __m256 t0 = _mm256_unpacklo_ps(z0, z1), t1 = _mm256_unpackhi_ps(z0, z1);  // blocks 0,1 | 4,5 ; 2,3 | 6,7
  const __m256 t2 = _mm256_unpacklo_ps(z2, z3), t3 = _mm256_unpackhi_ps(z2, z3);
  const __m256 b04 = _mm256_shuffle_ps(t0, t2, 0x44), b15 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 b26 = _mm256_shuffle_ps(t1, t3, 0x44), b37 = _mm256_shuffle_ps(t1, t3, 0xEE);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(b04, b15, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(b26, b37, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(b04, b15, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(b26, b37, 0x31));
}

// The 32 normals of Philox blocks block0 .. block0 + 7, in stream order (block-major, lane-minor).
inline void philox_normal32(uint64_t block0, uint64_t seed, float* out) {
  __m256i x[4];
  philox8(block0, seed, x);
  // Box–Muller on lane pairs (0, 1) and (2, 3), as philox_normal4.
  const __m256 minus_two = _mm256_set1_ps(-2.0f), two_pi = _mm256_set1_ps(6.283185307179586f);
  const __m256 r01 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(uniform8(x[0]))));
  const __m256 r23 = _mm256_sqrt_ps(_mm256_mul_ps(minus_two, Sleef_logf8_u10avx2(uniform8(x[2]))));
  const Sleef___m256_2 sc01 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, uniform8(x[1])));
  const Sleef___m256_2 sc23 = Sleef_sincosf8_u10avx2(_mm256_mul_ps(two_pi, uniform8(x[3])));
  store_block_major8(_mm256_mul_ps(r01, sc01.y), _mm256_mul_ps(r01, sc01.x), _mm256_mul_ps(r23, sc23.y),
                     _mm256_mul_ps(r23, sc23.x), out);
}

}  // namespace demem

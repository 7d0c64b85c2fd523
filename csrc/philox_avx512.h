// Philox4x32-10 and Box–Muller on sixteen counter blocks at once with AVX-512 (lanes = blocks), the
// vector path of the CPU noise in the AVX-512 build (cpu_fused_impl.h). The same arithmetic as
// philox_avx2.h, twice as wide: the Philox words bit for bit, the normals with SLEEF's 1-ulp logf
// (16 lanes) and sincosf (two 8-lane calls, see sincos16). Include only where AVX-512 F/DQ are enabled, after philox_avx2.h and after
// sleef.h's AVX-512 declarations are visible.
#pragma once

#include <immintrin.h>
#include <sleef.h>

#include <cstdint>

#include "demem_common.h"
#include "philox_avx2.h"

namespace demem {

// hi and lo 32 bits of m·x in each of the sixteen 32-bit lanes (m broadcast).
inline __m512i mulhilo16(__m512i m, __m512i x, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);                        // even lanes (64-bit products)
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);  // odd lanes
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// uniform8 on sixteen lanes.
inline __m512 uniform16(__m512i x) {
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(x, 16));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(x, _mm512_set1_epi32(0xFFFF)));
  const __m512 f = _mm512_add_ps(_mm512_mul_ps(hi, _mm512_set1_ps(65536.0f)), lo);
  return _mm512_add_ps(_mm512_mul_ps(f, _mm512_set1_ps(2.3283064365386962890625e-10f)),
                       _mm512_set1_ps(1.16415321826934814453125e-10f));
}

// SLEEF's 1-ulp sincosf of sixteen lanes, as two eight-lane calls: torch's Sleef_sincosf16_u10avx512f
// ran three times slower than two Sleef_sincosf8_u10avx2 on a Zen 5 (perf), the same values.
inline void sincos16(__m512 v, __m512& sin, __m512& cos) {
  const Sleef___m256_2 lo = Sleef_sincosf8_u10avx2(_mm512_castps512_ps256(v));
  const Sleef___m256_2 hi = Sleef_sincosf8_u10avx2(_mm512_extractf32x8_ps(v, 1));
  sin = _mm512_insertf32x8(_mm512_castps256_ps512(lo.x), hi.x, 1);
  cos = _mm512_insertf32x8(_mm512_castps256_ps512(lo.y), hi.y, 1);
}

// Philox4x32-10 of blocks block0 .. block0 + 15 at once: x[l] holds lane l of the sixteen blocks.
inline void philox16(uint64_t block0, uint64_t seed, __m512i x[4]) {
  alignas(64) uint32_t c0[16], c1[16];
  for (int b = 0; b < 16; ++b) {
    const uint64_t block = block0 + static_cast<uint64_t>(b);
    c0[b] = static_cast<uint32_t>(block);
    c1[b] = static_cast<uint32_t>(block >> 32);
  }
  __m512i x0 = _mm512_load_si512(c0), x1 = _mm512_load_si512(c1);
  __m512i x2 = _mm512_setzero_si512(), x3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int round = 0; round < 10; ++round) {
    __m512i lo0, lo1;
    const __m512i hi0 = mulhilo16(m0, x0, lo0);
    const __m512i hi1 = mulhilo16(m1, x2, lo1);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(static_cast<int>(k0)));
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(static_cast<int>(k1)));
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

// The 64 normals of Philox blocks block0 .. block0 + 15, in stream order (block-major, lane-minor).
inline void philox_normal64(uint64_t block0, uint64_t seed, float* out) {
  __m512i x[4];
  philox16(block0, seed, x);
  // Box–Muller on lane pairs (0, 1) and (2, 3), as philox_normal4.
  const __m512 minus_two = _mm512_set1_ps(-2.0f), two_pi = _mm512_set1_ps(6.283185307179586f);
  const __m512 r01 = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, Sleef_logf16_u10avx512f(uniform16(x[0]))));
  const __m512 r23 = _mm512_sqrt_ps(_mm512_mul_ps(minus_two, Sleef_logf16_u10avx512f(uniform16(x[2]))));
  __m512 sin01, cos01, sin23, cos23;
  sincos16(_mm512_mul_ps(two_pi, uniform16(x[1])), sin01, cos01);
  sincos16(_mm512_mul_ps(two_pi, uniform16(x[3])), sin23, cos23);
  const __m512 z0 = _mm512_mul_ps(r01, cos01), z1 = _mm512_mul_ps(r01, sin01);
  const __m512 z2 = _mm512_mul_ps(r23, cos23), z3 = _mm512_mul_ps(r23, sin23);
  // blocks 0-7 from the low halves, 8-15 from the high ones
  store_block_major8(_mm512_castps512_ps256(z0), _mm512_castps512_ps256(z1), _mm512_castps512_ps256(z2),
                     _mm512_castps512_ps256(z3), out);
  store_block_major8(_mm512_extractf32x8_ps(z0, 1), _mm512_extractf32x8_ps(z1, 1), _mm512_extractf32x8_ps(z2, 1),
                     _mm512_extractf32x8_ps(z3, 1), out + 32);
}

}  // namespace demem

// Scalar building blocks shared by the CPU kernels (C++) and the CUDA kernels (nvcc):
// Philox4x32-10, the Philox uniforms and Box–Muller normals, the risk threshold, the risk,
// the weights and the clip factor. One definition, so that CPU and CUDA round identically.
// Conventions: see demem_ext/ops/reference.py and demem_ext/ops/rule.py (the ground truth).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DEMEM_HD __host__ __device__ __forceinline__
#else
#define DEMEM_HD inline
#endif

namespace demem {

// Philox4x32-10 constants (Random123 / cuRAND).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr double kClipEps = 1e-6;

enum Selection : int { kHard = 0, kSoft = 1 };
enum ThresholdRule : int { kMean = 0, kQuantile = 1, kFixed = 2 };
enum ClipScope : int { kScopeAll = 0, kScopeHighRisk = 1 };

// The risk rule of DESIGN.md section 2 (validated on the host before any kernel runs).
struct RiskRule {
  double lam;
  int selection;  // Selection
  int rule;       // ThresholdRule
  double k;
  double quantile;
  double tau;
  double temperature;
};

// Products and sums that must not be contracted into an FMA (nvcc contracts by default and the
// reference, a sequence of separate tensor ops, rounds after every operation).
DEMEM_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
DEMEM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
DEMEM_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
DEMEM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10
// ---------------------------------------------------------------------------------------------
DEMEM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

// Ten rounds on ctr (in place) with key (k0, k1): Random123's philox4x32_10.
DEMEM_HD void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, ctr[0], hi0, lo0);
    mulhilo32(kPhiloxM1, ctr[2], hi1, lo1);
    const uint32_t c0 = hi1 ^ ctr[1] ^ k0;
    const uint32_t c2 = hi0 ^ ctr[3] ^ k1;
    ctr[0] = c0;
    ctr[1] = lo1;
    ctr[2] = c2;
    ctr[3] = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// u = x·2⁻³² + 2⁻³³ in float32: a uniform in (0, 1]. (x·2⁻³² is exact, so an FMA changes nothing.)
DEMEM_HD float philox_uniform(uint32_t x) {
  return static_cast<float>(x) * 2.3283064365386962890625e-10f + 1.16415321826934814453125e-10f;
}

// The 4 normals of counter block `block` (element j of a draw uses block offset + j/4, lane j%4).
// Counter = (lo32(block), hi32(block), 0, 0); key = (lo32(seed), hi32(seed)).
// Box–Muller in float32 on lane pairs (0, 1) and (2, 3).
DEMEM_HD void philox_normal4(uint64_t block, uint64_t seed, float z[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), 0u, 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float two_pi = 6.283185307179586f;  // float32(2π), as the reference's float32 tensor
  const float u0 = philox_uniform(c[0]), u1 = philox_uniform(c[1]);
  const float u2 = philox_uniform(c[2]), u3 = philox_uniform(c[3]);
  const float r01 = sqrtf(-2.0f * logf(u0));
  const float r23 = sqrtf(-2.0f * logf(u2));
  const float a01 = mul_rn(two_pi, u1);
  const float a23 = mul_rn(two_pi, u3);
  z[0] = mul_rn(r01, cosf(a01));
  z[1] = mul_rn(r01, sinf(a01));
  z[2] = mul_rn(r23, cosf(a23));
  z[3] = mul_rn(r23, sinf(a23));
}

// ---------------------------------------------------------------------------------------------
// Threshold, risk, weight, clip factor (all float64)
// ---------------------------------------------------------------------------------------------

// torch.quantile(sorted, q, interpolation="linear") on ascending values, bit for bit: ranks
// q·(n−1), lerp of the two neighbours with torch's formula (which ATen evaluates with FMAs).
DEMEM_HD double quantile_sorted(const double* sorted, int64_t n, double q) {
  const double rank = q * static_cast<double>(n - 1);
  int64_t below = static_cast<int64_t>(rank);
  int64_t above = static_cast<int64_t>(ceil(rank));
  if (below > n - 1) below = n - 1;
  if (above > n - 1) above = n - 1;
  const double weight = rank - static_cast<double>(below);
  const double a = sorted[below];
  const double b = sorted[above];
  const double diff = b - a;
  return fabs(weight) < 0.5 ? fma(weight, diff, a) : fma(-diff, 1.0 - weight, b);
}

// The exponent e of the power of two 2^e > max|s| (0 when max|s| is 0 or not finite): the moments of
// s/2^e cannot overflow, and scaling by a power of two changes no rounding (rule.moment_scale).
DEMEM_HD int moment_exponent(double max_abs) {
  if (!(max_abs > 0.0 && max_abs <= 1.7976931348623157e308)) return 0;  // 0, NaN or inf
  int e = 0;
  frexp(max_abs, &e);
  return e;
}

// τ = 2^e·(mean + k·std) from the population moments of s/2^e (mean and sum of squared deviations).
DEMEM_HD double mean_threshold(double mean, double sq_dev_sum, int64_t n, double k, int e) {
  const double std_dev = n > 1 ? sqrt(sq_dev_sum / static_cast<double>(n)) : 0.0;
  return ldexp(add_rn(mean, mul_rn(k, std_dev)), e);
}

// r = 1[s > τ] (hard, strict) or sigmoid((s − τ)/T) (soft).
DEMEM_HD double risk_of(double s, double tau, int selection, double temperature) {
  if (selection == kHard) return s > tau ? 1.0 : 0.0;
  const double x = (s - tau) / temperature;
  return 1.0 / (1.0 + exp(-x));
}

// w = 1 − λ·r
DEMEM_HD double weight_of(double risk, double lam) { return 1.0 - mul_rn(lam, risk); }

// Rounds a float64 value to the output dtype (float32 unless the output is float64) and back.
DEMEM_HD double round_to_output(double x, bool fp64) {
  return fp64 ? x : static_cast<double>(static_cast<float>(x));
}

// c = min(1, C/(n + 1e-6)); scope high_risk: 1 − r + r·c. Without clipping, 1.
DEMEM_HD double clip_factor(double norm, double risk, bool clip, double max_norm, int scope) {
  if (!clip) return 1.0;
  double c = max_norm / (norm + kClipEps);
  c = c > 1.0 ? 1.0 : c;  // NaN propagates, as torch.clamp
  if (scope == kScopeHighRisk) c = add_rn(1.0 - risk, mul_rn(risk, c));
  return c;
}

}  // namespace demem

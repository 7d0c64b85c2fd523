// The CPU fused DeMem step and the Philox normals, written once (at::vec::Vectorized; AVX2
// and AVX-512 intrinsics where ATen has no fast equivalent) and compiled three times:
// cpu_kernels.cpp (the default build flags), cpu_kernels_avx2.cpp (AVX2/FMA/F16C) and
// cpu_kernels_avx512.cpp (AVX-512 F/BW/VL/DQ; these two through cpu_kernels_isa.h), the widest chosen
// at run time on CPUs that have it. The includer defines DEMEM_FUSED_ENTRY, DEMEM_NORMALS_ENTRY and
// DEMEM_PASS_ENTRY, the names of the entry points (the fused step with a given schedule; Philox
// normals of a column range; one pass of the "columns" schedule alone, for the benchmark).
//
// Three schedules (cpu_schedule.h; cpu_schedule.cpp chooses one), each with two parallel regions
// (few synchronisations: a loaded machine with more runnable threads than cores makes every barrier
// expensive):
//
// "rows": the rows are split into one contiguous range per thread. A thread takes its rows in groups
//   of as many as fit in its share of the cache, at most plan.norm_rows (the streams its core reads
//   fastest): the norms of the group (sums of squares, see sum_squares_k; the rows read side by side; the rows
//   are now in cache), their clip factors and coefficients (the weights are known beforehand), then
//   one sweep acc += Σ_r coeff_r·g_r into its own accumulator [P] while the rows are still in cache.
//   G is read from memory once. Region 2 adds the per-thread accumulators in thread order, the
//   noise σ·C·ξ, and divides by D, column-parallel.
// "columns": region 1 computes sums of squares of groups of rows read side by side (plan.norm_rows,
//   measured per shape: one memory stream alone does not reach a core's bandwidth on an Intel Xeon,
//   while a Zen 4 core streams fastest with few), over whole rows or, with few groups of kMaxNormRows
//   per thread, over column pieces; then the coefficients; region 2, parallel over
//   column chunks, accumulates every row of its chunk in order into the output (the chunk stays in
//   L2), adds the noise and divides by D. G is read twice, each time as a few long streams.
// "mv": region 1 of "columns", then torch's matrix product (at::mm, what `coeff @ G` runs) for
//   coeffᵀG, then the noise and 1/D (float32/float64 gradients).
// In all three, the normals ξ are drawn during region 1's norm sweeps into a buffer [P] (NoisePlan):
// Philox and Box–Muller are compute-bound and hide, in part, in the memory-bound sweeps.
//
// The AVX2 and AVX-512 builds convert floats to doubles with the vector instruction (ATen's generic
// conversion goes through memory) and draw the noise eight (AVX2) or sixteen (AVX-512) Philox blocks at a
// time, with SLEEF's log and sincos (1-ulp); the default build draws it one block at a time with the C library's functions.
// The two noises agree to a few float32 ulps (as the reference, whose functions are torch's).
//
// Each output column is a sum over rows in index order (within a thread's row range for "rows"), so
// for a fixed number of threads the result is deterministic.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_schedule.h"
#include "demem_common.h"
#include "demem_kernels.h"

#if !defined(DEMEM_FUSED_ENTRY) || !defined(DEMEM_NORMALS_ENTRY) || !defined(DEMEM_PASS_ENTRY)
#error "define DEMEM_FUSED_ENTRY, DEMEM_NORMALS_ENTRY and DEMEM_PASS_ENTRY before including cpu_fused_impl.h"
#endif

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include "philox_avx2.h"
#endif
#if defined(CPU_CAPABILITY_AVX512)
#include "philox_avx512.h"
#endif

namespace demem {

// out[0:n] = the Philox normals of elements 4·block0 .. 4·block0 + n − 1 of the stream `seed`
// (element j: block j/4, lane j%4). Serial; defined below for this build.
void DEMEM_NORMALS_ENTRY(float* out, int64_t n, uint64_t seed, uint64_t block0);

namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 65536;              // columns per accumulation task (multiple of 4 and of vector widths)
constexpr int64_t kNormChunk = 65536;          // columns per norm task of the "columns" schedule (at least)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kDraw = 64;  // normals per draw in a norm sweep: one call of the widest Philox path
#else
constexpr int64_t kDraw = 32;
#endif
constexpr int64_t kDrawSpacing = 2048 * kDraw / 32;  // elements of a norm sweep per draw (at most)
constexpr int64_t kMinTaskBytes = 512 * 1024;  // less work than this per thread is not worth a thread
constexpr int64_t kMinFinishColumns = 8192;    // columns per task of the noise/finish region

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Loads one vector of scalar_t and widens it to kN vectors of the accumulation type.
template <typename scalar_t>
struct Widen {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr int kN = 1;
  static constexpr int64_t kStep = Vectorized<acc_t>::size();
  static void load(const scalar_t* p, Vectorized<acc_t> out[kN]) { out[0] = Vectorized<acc_t>::loadu(p); }
};

template <typename reduced_t>
struct WidenReduced {
  using acc_t = float;
  static constexpr int kN = 2;
  static constexpr int64_t kStep = Vectorized<reduced_t>::size();
  static_assert(kStep == 2 * Vectorized<float>::size(), "reduced-precision vectors widen to two float vectors");
  static void load(const reduced_t* p, Vectorized<float> out[kN]) {
    auto [lo, hi] = at::vec::convert_to_float<reduced_t>(Vectorized<reduced_t>::loadu(p));
    out[0] = lo;
    out[1] = hi;
  }
};
template <>
struct Widen<c10::Half> : WidenReduced<c10::Half> {};
template <>
struct Widen<c10::BFloat16> : WidenReduced<c10::BFloat16> {};

// Adds the squares of a vector to float64 accumulators (the square of a float is exact in float64).
inline void add_squares(const Vectorized<float>& v, Vectorized<double>& a0, Vectorized<double>& a1) {
  static_assert(Vectorized<float>::size() == 2 * Vectorized<double>::size(), "float vector = 2 double vectors");
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  const Vectorized<double> d0(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  const Vectorized<double> d1(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#elif defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  const Vectorized<double> d0(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  const Vectorized<double> d1(_mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
#else
  auto d = at::vec::convert<double, 2, float, 1>(at::vec::VectorizedN<float, 1>(v));
  const Vectorized<double> d0 = d[0], d1 = d[1];
#endif
  a0 = at::vec::fmadd(d0, d0, a0);
  a1 = at::vec::fmadd(d1, d1, a1);
}
inline void add_squares(const Vectorized<double>& v, Vectorized<double>& a0, Vectorized<double>&) {
  a0 = at::vec::fmadd(v, v, a0);
}

// Normals z[0:count) of Philox blocks block0.. (count 0: none).
struct NoiseSlice {
  float* z = nullptr;
  int64_t count = 0;
  uint64_t seed = 0;
  uint64_t block0 = 0;
};

// The step's P normals, drawn during the norm sweeps (compute-bound work that hides in the
// memory-bound sweeps) into a buffer that the finish step adds: sweep `item` (of `items`, each over
// `sweep_len` elements) draws slice(item). A sweep draws kDraw normals per kDrawSpacing elements or
// more (32 per 2048); measured on a Zen 4, sparser draws slowed the sweeps down more than they hid.
struct NoisePlan {
  float* z = nullptr;  // [P]; nullptr without noise
  int64_t total = 0;
  int64_t per_item = 0;  // a multiple of kDraw (whole draws of DEMEM_NORMALS_ENTRY's vector path)
  uint64_t seed = 0;
  uint64_t offset = 0;

  NoisePlan(float* buffer, int64_t P, int64_t items, int64_t sweep_len, uint64_t seed_, uint64_t offset_)
      : z(buffer),
        total(P),
        per_item(kDraw *
                 std::max(divup(sweep_len, kDrawSpacing), divup(divup(P, std::max<int64_t>(1, items)), kDraw))),
        seed(seed_),
        offset(offset_) {}
  const float* column(int64_t col0) const { return z == nullptr ? nullptr : z + col0; }
  // The normals of items item .. item + count − 1 (contiguous in z).
  NoiseSlice slice(int64_t item, int64_t count = 1) const {
    if (z == nullptr) return {};
    const int64_t lo = std::min(total, item * per_item), hi = std::min(total, (item + count) * per_item);
    return {z + lo, hi - lo, seed, offset + static_cast<uint64_t>(lo / 4)};
  }
};

// Adds a float vector to float64 accumulators (a0 += low half, a1 += high half).
inline void add_widened(const Vectorized<float>& v, Vectorized<double>& a0, Vectorized<double>& a1) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 f = v;
  a0 = a0 + Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
  a1 = a1 + Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#elif defined(CPU_CAPABILITY_AVX512)
  const __m512 f = v;
  a0 = a0 + Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
  a1 = a1 + Vectorized<double>(_mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
#else
  auto d = at::vec::convert<double, 2, float, 1>(at::vec::VectorizedN<float, 1>(v));
  a0 = a0 + d[0];
  a1 = a1 + d[1];
#endif
}

// Squares of float32 and float64 rows are added in float64 (a float's square is exact there).
// Squares of bfloat16 and float16 rows are exact in float32: they are added in float32 over
// blocks of kReducedBlock vectors (kReducedBlock·2 terms per lane, relative error below
// 2·kReducedBlock·2⁻²⁴, far inside these types' rounding), then the blocks in float64. The
// reduced types' norm sweeps are then as cheap per byte as the float32 ones.
constexpr int64_t kReducedBlock = 32;

// out[k] = Σ x[k·stride + 0:n]² for the K rows, read side by side (see above for the accumulation);
// draws the normals of `noise` in between (spread over the sweep, kDraw at a time). The sums do not
// depend on the noise nor on K (one float64 accumulator vector per row, the same order for any K),
// so the number of rows read side by side is a matter of speed only.
template <typename scalar_t, int K>
void sum_squares_k(const scalar_t* x, int64_t stride, int64_t n, double* out, const NoiseSlice& noise) {
  using W = Widen<scalar_t>;
  using acc_t = typename W::acc_t;
  constexpr bool kReduced = W::kN == 2;
  Vectorized<double> a[K];
  for (int k = 0; k < K; ++k) a[k] = Vectorized<double>(0.0);
  const int64_t vec_end = n - n % W::kStep;
  const int64_t draws = divup(noise.count, kDraw);
  // Draws fall between whole reduced blocks, so that the blocks start at multiples of kUnit whatever
  // the draws (their number depends on K).
  constexpr int64_t kUnit = kReduced ? kReducedBlock * W::kStep : W::kStep;
  int64_t i = 0;
  for (int64_t d = 0; d <= draws; ++d) {
    const int64_t stop = d == draws ? vec_end : (vec_end / kUnit) * (d + 1) / (draws + 1) * kUnit;
    if constexpr (kReduced) {
      while (i < stop) {
        const int64_t block_end = std::min(stop, i + kReducedBlock * W::kStep);
        Vectorized<float> f[K];
        for (int k = 0; k < K; ++k) f[k] = Vectorized<float>(0.0f);
        for (; i < block_end; i += W::kStep) {
          for (int k = 0; k < K; ++k) {
            Vectorized<float> u[2];
            W::load(x + k * stride + i, u);
            f[k] = at::vec::fmadd(u[0], u[0], f[k]);
            f[k] = at::vec::fmadd(u[1], u[1], f[k]);
          }
        }
        for (int k = 0; k < K; ++k) add_widened(f[k], a[k], a[k]);
      }
    } else {
      for (; i < stop; i += W::kStep) {
        for (int k = 0; k < K; ++k) {
          Vectorized<acc_t> u[W::kN];
          W::load(x + k * stride + i, u);
          for (int q = 0; q < W::kN; ++q) add_squares(u[q], a[k], a[k]);
        }
      }
    }
    if (d < draws) {
      DEMEM_NORMALS_ENTRY(noise.z + kDraw * d, std::min<int64_t>(kDraw, noise.count - kDraw * d), noise.seed,
                          noise.block0 + static_cast<uint64_t>(kDraw / 4 * d));
    }
  }
  for (int k = 0; k < K; ++k) {
    double total = at::vec::vec_reduce_all<double>(
        [](const Vectorized<double>& p, const Vectorized<double>& q) { return p + q; }, a[k]);
    for (int64_t j = vec_end; j < n; ++j) {
      const double v = static_cast<double>(x[k * stride + j]);
      total += v * v;
    }
    out[k] = total;
  }
}

// sum_squares_k for 1 <= rows <= K rows.
template <typename scalar_t, int K = kMaxNormRows>
void sum_squares_rows(const scalar_t* x, int64_t stride, int64_t n, int64_t rows, double* out,
                      const NoiseSlice& noise = {}) {
  if constexpr (K > 1) {
    if (rows < K) return sum_squares_rows<scalar_t, K - 1>(x, stride, n, rows, out, noise);
  }
  sum_squares_k<scalar_t, K>(x, stride, n, out, noise);
}

// acc[0:n] += Σ_{r<R} c[r]·x[r·stride + 0:n], one sweep (acc loaded and stored once per R rows).
template <typename scalar_t, int R>
void accumulate_k(acc_type_t<scalar_t>* acc, const scalar_t* x, int64_t stride, int64_t n,
                  const acc_type_t<scalar_t>* c) {
  using W = Widen<scalar_t>;
  using acc_t = typename W::acc_t;
  using AV = Vectorized<acc_t>;
  constexpr int64_t kAccW = AV::size();
  const int64_t n_vec = n - n % W::kStep;
  AV cv[R];
  for (int k = 0; k < R; ++k) cv[k] = AV(c[k]);
  for (int64_t i = 0; i < n_vec; i += W::kStep) {
    AV g[R][W::kN];
    for (int k = 0; k < R; ++k) W::load(x + k * stride + i, g[k]);
    for (int q = 0; q < W::kN; ++q) {
      AV a = AV::loadu(acc + i + q * kAccW);
      for (int k = 0; k < R; ++k) a = at::vec::fmadd(cv[k], g[k][q], a);
      a.store(acc + i + q * kAccW);
    }
  }
  for (int64_t i = n_vec; i < n; ++i) {
    acc_t a = acc[i];
    for (int k = 0; k < R; ++k) a = a + c[k] * static_cast<acc_t>(x[k * stride + i]);
    acc[i] = a;
  }
}

// acc[0:n] (+)= Σ_{r<rows} c[r]·x[r·stride + 0:n], rows in order; from zero when `fresh`. Eight rows
// a sweep (eight memory streams), then four, then one.
template <typename scalar_t>
void accumulate_rows(acc_type_t<scalar_t>* acc, const scalar_t* x, int64_t stride, int64_t n,
                     const acc_type_t<scalar_t>* c, int64_t rows, bool fresh) {
  if (fresh) std::fill(acc, acc + n, acc_type_t<scalar_t>(0));
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) accumulate_k<scalar_t, 8>(acc, x + r * stride, stride, n, c + r);
  for (; r + 4 <= rows; r += 4) accumulate_k<scalar_t, 4>(acc, x + r * stride, stride, n, c + r);
  for (; r < rows; ++r) accumulate_k<scalar_t, 1>(acc, x + r * stride, stride, n, c + r);
}

// out[0:n] = (out + std·z[0:n]) / denom; without noise (z == nullptr), out / denom.
template <typename acc_t>
void finish_columns(acc_t* out, int64_t n, const float* z, double noise_std, double denom) {
  const acc_t d = static_cast<acc_t>(denom);
  if (z == nullptr) {
    for (int64_t i = 0; i < n; ++i) out[i] = out[i] / d;
    return;
  }
  const acc_t s = static_cast<acc_t>(noise_std);
  for (int64_t i = 0; i < n; ++i) out[i] = (out[i] + s * static_cast<acc_t>(z[i])) / d;
}

// The noise buffer of a step: P floats when there is noise, else nullptr. The calling thread's
// later steps reuse it (a fresh allocation each step would page-fault on every first touch).
inline float* noise_buffer(const FusedCpuArgs& a) {
  if (a.noise_std <= 0) return nullptr;
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(a.cols)) buffer.resize(static_cast<size_t>(a.cols));
  return buffer.data();
}

// Norm, clip factor and coefficient of row i from its sum of squares; writes norms[i], coeff[i].
template <typename acc_t>
inline acc_t row_coefficient(const FusedCpuArgs& a, int64_t i, double sum_sq) {
  const double norm = std::sqrt(sum_sq);
  const double clip = clip_factor(norm, a.risk[i], a.clip, a.max_norm, a.scope);
  const acc_t cf = static_cast<acc_t>(a.weights[i] * clip);
  static_cast<acc_t*>(a.norms)[i] = static_cast<acc_t>(norm);
  static_cast<acc_t*>(a.coeff)[i] = cf;
  return cf;
}

// Adds the per-part accumulators `extra` (parts − 1 of [P]) into grad, then the noise and 1/D;
// column-parallel.
template <typename acc_t>
void finish_region(const FusedCpuArgs& a, acc_t* grad, const acc_t* extra, int64_t parts, const NoisePlan& noise,
                   int64_t threads) {
  const int64_t P = a.cols;
  const int64_t nch = divup(P, kChunk);
  const int64_t finish_grain = std::max(divup(nch, threads), divup(kMinFinishColumns, kChunk));
  at::parallel_for(0, nch, finish_grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t col0 = c * kChunk, n = std::min(kChunk, P - col0);
      acc_t* out = grad + col0;
      for (int64_t p = 1; p < parts; ++p) {
        const acc_t* src = extra + (p - 1) * P + col0;
        for (int64_t i = 0; i < n; ++i) out[i] += src[i];
      }
      finish_columns(out, n, noise.column(col0), a.noise_std, a.denom);
    }
  });
}

template <typename scalar_t>
void fused_rows_schedule(const FusedCpuArgs& a, int64_t parts, int64_t group, int64_t threads) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* G = static_cast<const scalar_t*>(a.grads);
  acc_t* grad = static_cast<acc_t*>(a.grad);
  const int64_t B = a.rows, P = a.cols;
  // One accumulator per row range; the first range accumulates into the output itself, the others
  // into a buffer that the calling thread's later steps reuse (as noise_buffer). The workers see it
  // through `extra` (a thread_local named inside them would be their own).
  thread_local std::vector<acc_t> buffer;
  if (buffer.size() < static_cast<size_t>((parts - 1) * P)) buffer.resize(static_cast<size_t>((parts - 1) * P));
  acc_t* const extra = buffer.data();
  auto accumulator = [grad, extra, P](int64_t p) { return p == 0 ? grad : extra + (p - 1) * P; };
  const int64_t per_part = divup(B, parts);
  float* const noise_z = noise_buffer(a);
  const NoisePlan noise(noise_z, P, B, P, a.seed, a.offset);

  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    acc_t cf[kMaxNormRows];
    double ss[kMaxNormRows];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r_begin = p * per_part, r_end = std::min(B, r_begin + per_part);
      acc_t* acc = accumulator(p);
      if (r_begin >= r_end) {
        std::fill(acc, acc + P, acc_t(0));
        continue;
      }
      for (int64_t r0 = r_begin; r0 < r_end; r0 += group) {
        const int64_t nr = std::min(group, r_end - r0);
        sum_squares_rows(G + r0 * P, P, P, nr, ss, noise.slice(r0, nr));
        for (int64_t r = 0; r < nr; ++r) cf[r] = row_coefficient<acc_t>(a, r0 + r, ss[r]);
        accumulate_rows<scalar_t>(acc, G + r0 * P, P, P, cf, nr, r0 == r_begin);
      }
    }
  });
  finish_region(a, grad, extra, parts, noise, threads);
}

// Region 1 of "columns" and "mv": the sums of squares of groups of norm_rows rows (whole rows, or
// column pieces of at least kNormChunk when there are few groups of kMaxNormRows per thread: the
// pieces, hence the sums, do not depend on norm_rows), the normals, then the norms and coefficients
// (written to a.norms, a.coeff; run returns the coefficients).
template <typename scalar_t>
struct NormsRegion {
  int64_t rows_per_group, groups, piece, nn;
  NoisePlan noise;
  NormsRegion(const FusedCpuArgs& a, float* z, int64_t threads, int norm_rows)
      : rows_per_group(std::clamp(norm_rows, 1, kMaxNormRows)),
        groups(divup(a.rows, rows_per_group)),
        piece(std::max(kNormChunk, 64 * divup(divup(a.cols, divup(4 * threads, divup(a.rows, kMaxNormRows))), 64))),
        nn(divup(a.cols, piece)),
        noise(z, a.cols, groups * nn, std::min(piece, a.cols) * std::min(a.rows, rows_per_group), a.seed,
              a.offset) {}

  std::vector<acc_type_t<scalar_t>> run(const FusedCpuArgs& a, int64_t threads) const {
    const scalar_t* G = static_cast<const scalar_t*>(a.grads);
    const int64_t B = a.rows, P = a.cols;
    std::vector<double> partial(static_cast<size_t>(B * nn));
    // (group, piece) tasks, piece-major so neighbouring tasks share a column range.
    at::parallel_for(0, groups * nn, divup(groups * nn, threads), [&](int64_t begin, int64_t end) {
      double ss[kMaxNormRows];
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t c = idx / groups, r0 = (idx % groups) * rows_per_group;
        const int64_t nr = std::min(rows_per_group, B - r0), col0 = c * piece;
        sum_squares_rows(G + r0 * P + col0, P, std::min(piece, P - col0), nr, ss, noise.slice(idx));
        for (int64_t r = 0; r < nr; ++r) partial[(r0 + r) * nn + c] = ss[r];
      }
    });
    std::vector<acc_type_t<scalar_t>> cf(static_cast<size_t>(B));
    for (int64_t r = 0; r < B; ++r) {
      double ss = 0.0;
      for (int64_t c = 0; c < nn; ++c) ss += partial[r * nn + c];
      cf[r] = row_coefficient<acc_type_t<scalar_t>>(a, r, ss);
    }
    return cf;
  }
};

// Region 2 of "columns": every row of a column chunk, in order, into the output chunk; then the
// noise and 1/D.
template <typename scalar_t>
void accumulate_region(const FusedCpuArgs& a, const acc_type_t<scalar_t>* cf, const NoisePlan& noise,
                       int64_t threads) {
  const scalar_t* G = static_cast<const scalar_t*>(a.grads);
  acc_type_t<scalar_t>* grad = static_cast<acc_type_t<scalar_t>*>(a.grad);
  const int64_t B = a.rows, P = a.cols;
  const int64_t nch = divup(P, kChunk);
  at::parallel_for(0, nch, divup(nch, threads), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t col0 = c * kChunk, n = std::min(kChunk, P - col0);
      accumulate_rows<scalar_t>(grad + col0, G + col0, P, n, cf, B, true);
      finish_columns(grad + col0, n, noise.column(col0), a.noise_std, a.denom);
    }
  });
}

template <typename scalar_t>
void fused_columns_schedule(const FusedCpuArgs& a, int64_t threads, int norm_rows) {
  float* const noise_z = noise_buffer(a);
  const NormsRegion<scalar_t> norms(a, noise_z, threads, norm_rows);
  accumulate_region<scalar_t>(a, norms.run(a, threads).data(), norms.noise, threads);
}

template <typename scalar_t>
void fused_mv_schedule(const FusedCpuArgs& a, int64_t threads, int norm_rows) {
  using acc_t = acc_type_t<scalar_t>;
  float* const noise_z = noise_buffer(a);
  const NormsRegion<scalar_t> norms(a, noise_z, threads, norm_rows);
  const std::vector<acc_t> cf = norms.run(a, threads);
  cpu_gemv(a, cf.data());
  finish_region<acc_t>(a, static_cast<acc_t*>(a.grad), nullptr, 1, norms.noise, threads);
}

// Threads for a step on [B, P]: at most one per kMinTaskBytes of gradients (tiny steps are not
// worth the fork/join).
template <typename scalar_t>
int64_t step_threads(int64_t B, int64_t P) {
  const int64_t work_bytes = B * P * static_cast<int64_t>(sizeof(scalar_t));
  return std::clamp<int64_t>(work_bytes / kMinTaskBytes, 1, std::max(1, at::get_num_threads()));
}

// One pass of "columns" alone (cpu_passes.cpp, and the calibration of norm_rows): kNorms, region 1
// with its normals (norms and coefficients into a.norms, a.coeff); kAccumulate, region 2 with the
// coefficients a.coeff, no noise.
template <typename scalar_t>
void pass_impl(const FusedCpuArgs& a, CpuPass pass, int norm_rows) {
  const int64_t threads = step_threads<scalar_t>(a.rows, a.cols);
  if (pass == CpuPass::kNorms) {
    float* const noise_z = noise_buffer(a);
    NormsRegion<scalar_t>(a, noise_z, threads, norm_rows).run(a, threads);
    return;
  }
  const NoisePlan none(nullptr, a.cols, 1, a.cols, 0, 0);
  accumulate_region<scalar_t>(a, static_cast<const acc_type_t<scalar_t>*>(a.coeff), none, threads);
}

template <typename scalar_t>
void fused_step_impl(const FusedCpuArgs& a, const CpuPlan& plan) {
  const CpuSchedule schedule = plan.schedule;
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = a.rows, P = a.cols;
  const int64_t threads = step_threads<scalar_t>(B, P);
  if (schedule == CpuSchedule::kRows && B > 0) {
    const int64_t row_bytes = std::max<int64_t>(1, P * static_cast<int64_t>(sizeof(scalar_t)));
    const int64_t acc_bytes = P * static_cast<int64_t>(sizeof(acc_t));
    const int64_t group =
        std::clamp<int64_t>((cpu_cache_budget(std::min(threads, B)) - acc_bytes) / row_bytes, 1, plan.norm_rows);
    return fused_rows_schedule<scalar_t>(a, std::min(threads, B), group, threads);
  }
  if (schedule == CpuSchedule::kMv && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>)) {
    return fused_mv_schedule<scalar_t>(a, threads, plan.norm_rows);
  }
  fused_columns_schedule<scalar_t>(a, threads, plan.norm_rows);
}

}  // namespace

void DEMEM_NORMALS_ENTRY(float* out, int64_t n, uint64_t seed, uint64_t block0) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#if defined(CPU_CAPABILITY_AVX512)
  for (; j + 64 <= n; j += 64) philox_normal64(block0 + static_cast<uint64_t>(j / 4), seed, out + j);
#endif
  for (; j + 32 <= n; j += 32) philox_normal32(block0 + static_cast<uint64_t>(j / 4), seed, out + j);
  if (j < n) {
    float z[32];
    philox_normal32(block0 + static_cast<uint64_t>(j / 4), seed, z);
    std::copy(z, z + (n - j), out + j);
  }
#else
  for (; j < n; j += 4) {
    float z[4];
    philox_normal4(block0 + static_cast<uint64_t>(j / 4), seed, z);
    std::copy(z, z + std::min<int64_t>(4, n - j), out + j);
  }
#endif
}

void DEMEM_PASS_ENTRY(const FusedCpuArgs& args, CpuPass pass, int norm_rows) {
  switch (args.kind) {
    case GradKind::kHalf:
      return pass_impl<c10::Half>(args, pass, norm_rows);
    case GradKind::kBFloat16:
      return pass_impl<c10::BFloat16>(args, pass, norm_rows);
    case GradKind::kFloat:
      return pass_impl<float>(args, pass, norm_rows);
    case GradKind::kDouble:
      return pass_impl<double>(args, pass, norm_rows);
  }
}

void DEMEM_FUSED_ENTRY(const FusedCpuArgs& args, const CpuPlan& plan) {
  switch (args.kind) {
    case GradKind::kHalf:
      return fused_step_impl<c10::Half>(args, plan);
    case GradKind::kBFloat16:
      return fused_step_impl<c10::BFloat16>(args, plan);
    case GradKind::kFloat:
      return fused_step_impl<float>(args, plan);
    case GradKind::kDouble:
      return fused_step_impl<double>(args, plan);
  }
}

}  // namespace demem

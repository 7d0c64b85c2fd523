// The CPU fused DeMem step and the Philox normals, written once (at::vec::Vectorized; AVX2
// intrinsics where ATen has no fast equivalent) and compiled twice:
// cpu_kernels.cpp (the default build flags) and cpu_kernels_avx2.cpp (AVX2/FMA/F16C, chosen at run
// time on CPUs that have them). The includer defines DEMEM_FUSED_ENTRY and DEMEM_NORMALS_ENTRY, the
// names of the two entry points (the fused step; Philox normals of a column range).
//
// Two schedules, each with two parallel regions (few synchronisations: a loaded machine with more
// runnable threads than cores makes every barrier expensive):
//
// "rows" (a group of rows and an accumulator [P] fit in this thread's share of the cache, see
//   cpu_cache_budget, and re-reading them from cache beats a second pass over memory; B >= threads):
//   the rows are split into one contiguous range per thread. A thread takes its rows in small groups: the norms of the group (float64 sums of squares; the rows
//   are now in cache), their clip factors and coefficients (the weights are known beforehand), then
//   one sweep acc += Σ_r coeff_r·g_r into its own accumulator [P] while the rows are still in cache.
//   G is read from memory once. Region 2 adds the per-thread accumulators in thread order, the
//   noise σ·C·ξ, and divides by D, column-parallel.
// "columns" (long rows that do not fit, or fewer rows than threads): region 1 computes sums of
//   squares of whole rows (or, with fewer rows than threads, of row pieces) in parallel; then the
//   coefficients; region 2, parallel over column chunks, accumulates every row of its chunk in order
//   into the output (the chunk stays in L2), adds the noise and divides by D. G is read twice, each
//   time as long streams.
// In both, the normals ξ are drawn during region 1's norm sweeps into a buffer [P] (NoisePlan):
// Philox and Box–Muller are compute-bound and hide, in part, in the memory-bound sweeps.
//
// The AVX2 build converts floats to doubles with the AVX instruction (ATen's generic conversion
// goes through memory) and draws the noise eight Philox blocks at a time, with SLEEF's log and
// sincos (1-ulp); the default build draws it one block at a time with the C library's functions.
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
#include <memory>
#include <type_traits>
#include <vector>

#include "demem_common.h"
#include "demem_kernels.h"

#if !defined(DEMEM_FUSED_ENTRY) || !defined(DEMEM_NORMALS_ENTRY)
#error "define DEMEM_FUSED_ENTRY and DEMEM_NORMALS_ENTRY before including cpu_fused_impl.h"
#endif

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include "philox_avx2.h"
#endif

namespace demem {

// Bytes of cache one of `threads` threads may fill with rows and an accumulator (cpu_kernels.cpp).
int64_t cpu_cache_budget(int64_t threads);

// out[0:n] = the Philox normals of elements 4·block0 .. 4·block0 + n − 1 of the stream `seed`
// (element j: block j/4, lane j%4). Serial; defined below for this build.
void DEMEM_NORMALS_ENTRY(float* out, int64_t n, uint64_t seed, uint64_t block0);

namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 65536;              // columns per accumulation task (multiple of 4 and of vector widths)
constexpr int64_t kNormChunk = 65536;          // columns per norm task of the "columns" schedule (at least)
constexpr int64_t kMaxGroup = 4;               // rows per group of the "rows" schedule (one sweep)
constexpr int64_t kDrawSpacing = 2048;         // elements of a norm sweep per 32 normals drawn (at most)
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
// `sweep_len` elements) draws slice(item). A sweep draws 32 normals per kDrawSpacing elements or
// more; measured on a Zen 4, sparser draws slowed the sweeps down more than they hid.
struct NoisePlan {
  float* z = nullptr;  // [P]; nullptr without noise
  int64_t total = 0;
  int64_t per_item = 0;  // a multiple of 32 (whole draws of DEMEM_NORMALS_ENTRY's vector path)
  uint64_t seed = 0;
  uint64_t offset = 0;

  NoisePlan(float* buffer, int64_t P, int64_t items, int64_t sweep_len, uint64_t seed_, uint64_t offset_)
      : z(buffer),
        total(P),
        per_item(32 * std::max(divup(sweep_len, kDrawSpacing), divup(divup(P, std::max<int64_t>(1, items)), 32))),
        seed(seed_),
        offset(offset_) {}
  const float* column(int64_t col0) const { return z == nullptr ? nullptr : z + col0; }
  NoiseSlice slice(int64_t item) const {
    if (z == nullptr) return {};
    const int64_t lo = std::min(total, item * per_item), hi = std::min(total, lo + per_item);
    return {z + lo, hi - lo, seed, offset + static_cast<uint64_t>(lo / 4)};
  }
};

// Σ x² over n elements, accumulated in float64; draws the normals of `noise` in between (spread
// over the sweep, 32 at a time). The sum does not depend on the noise (same accumulators, same order).
template <typename scalar_t>
double sum_squares(const scalar_t* x, int64_t n, const NoiseSlice& noise = {}) {
  using W = Widen<scalar_t>;
  using acc_t = typename W::acc_t;
  constexpr int64_t kPair = 2 * W::kStep;
  Vectorized<double> a0(0.0), a1(0.0), b0(0.0), b1(0.0);
  const int64_t pairs_end = n - n % kPair;
  const int64_t draws = divup(noise.count, 32);
  int64_t i = 0;
  for (int64_t d = 0; d <= draws; ++d) {
    const int64_t stop = d == draws ? pairs_end : (pairs_end / kPair) * (d + 1) / (draws + 1) * kPair;
    for (; i < stop; i += kPair) {
      Vectorized<acc_t> u[W::kN], v[W::kN];
      W::load(x + i, u);
      W::load(x + i + W::kStep, v);
      for (int q = 0; q < W::kN; ++q) {
        add_squares(u[q], a0, a1);
        add_squares(v[q], b0, b1);
      }
    }
    if (d < draws) {
      DEMEM_NORMALS_ENTRY(noise.z + 32 * d, std::min<int64_t>(32, noise.count - 32 * d), noise.seed,
                          noise.block0 + static_cast<uint64_t>(8 * d));
    }
  }
  for (; i + W::kStep <= n; i += W::kStep) {
    Vectorized<acc_t> u[W::kN];
    W::load(x + i, u);
    for (int q = 0; q < W::kN; ++q) add_squares(u[q], a0, a1);
  }
  double total = at::vec::vec_reduce_all<double>(
      [](const Vectorized<double>& p, const Vectorized<double>& q) { return p + q; }, (a0 + a1) + (b0 + b1));
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    total += v * v;
  }
  return total;
}

// acc[0:n] (+)= Σ_{r<rows} c[r]·x[r·stride + 0:n], rows in order; from zero when `fresh`.
template <typename scalar_t>
void accumulate_rows(acc_type_t<scalar_t>* acc, const scalar_t* x, int64_t stride, int64_t n,
                     const acc_type_t<scalar_t>* c, int64_t rows, bool fresh) {
  using W = Widen<scalar_t>;
  using acc_t = typename W::acc_t;
  using AV = Vectorized<acc_t>;
  constexpr int64_t kAccW = AV::size();
  const int64_t n_vec = n - n % W::kStep;
  if (fresh) std::fill(acc, acc + n, acc_t(0));
  int64_t r = 0;
  // Four rows per sweep: the accumulator is loaded and stored once per four rows.
  for (; r + 4 <= rows; r += 4) {
    const scalar_t* x0 = x + r * stride;
    const scalar_t* x1 = x0 + stride;
    const scalar_t* x2 = x1 + stride;
    const scalar_t* x3 = x2 + stride;
    const AV c0(c[r]), c1(c[r + 1]), c2(c[r + 2]), c3(c[r + 3]);
    for (int64_t i = 0; i < n_vec; i += W::kStep) {
      AV g0[W::kN], g1[W::kN], g2[W::kN], g3[W::kN];
      W::load(x0 + i, g0);
      W::load(x1 + i, g1);
      W::load(x2 + i, g2);
      W::load(x3 + i, g3);
      for (int q = 0; q < W::kN; ++q) {
        AV a = AV::loadu(acc + i + q * kAccW);
        a = at::vec::fmadd(c0, g0[q], a);
        a = at::vec::fmadd(c1, g1[q], a);
        a = at::vec::fmadd(c2, g2[q], a);
        a = at::vec::fmadd(c3, g3[q], a);
        a.store(acc + i + q * kAccW);
      }
    }
    for (int64_t i = n_vec; i < n; ++i) {
      acc_t a = acc[i];
      a = a + c[r] * static_cast<acc_t>(x0[i]);
      a = a + c[r + 1] * static_cast<acc_t>(x1[i]);
      a = a + c[r + 2] * static_cast<acc_t>(x2[i]);
      a = a + c[r + 3] * static_cast<acc_t>(x3[i]);
      acc[i] = a;
    }
  }
  for (; r < rows; ++r) {
    const scalar_t* x0 = x + r * stride;
    const AV c0(c[r]);
    for (int64_t i = 0; i < n_vec; i += W::kStep) {
      AV g0[W::kN];
      W::load(x0 + i, g0);
      for (int q = 0; q < W::kN; ++q) {
        AV a = AV::loadu(acc + i + q * kAccW);
        a = at::vec::fmadd(c0, g0[q], a);
        a.store(acc + i + q * kAccW);
      }
    }
    for (int64_t i = n_vec; i < n; ++i) acc[i] = acc[i] + c[r] * static_cast<acc_t>(x0[i]);
  }
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

// The noise buffer of a step: P floats when there is noise, else empty (the plan's z is nullptr).
inline std::unique_ptr<float[]> noise_buffer(const FusedCpuArgs& a) {
  return a.noise_std > 0 ? std::unique_ptr<float[]>(new float[static_cast<size_t>(a.cols)]) : nullptr;
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

template <typename scalar_t>
void fused_rows_schedule(const FusedCpuArgs& a, int64_t parts, int64_t group, int64_t threads) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* G = static_cast<const scalar_t*>(a.grads);
  acc_t* grad = static_cast<acc_t*>(a.grad);
  const int64_t B = a.rows, P = a.cols;
  // One accumulator per row range; the first range accumulates into the output itself.
  std::vector<acc_t> extra(static_cast<size_t>((parts - 1) * P));
  auto accumulator = [&](int64_t p) { return p == 0 ? grad : extra.data() + (p - 1) * P; };
  const int64_t per_part = divup(B, parts);
  const auto noise_z = noise_buffer(a);
  const NoisePlan noise(noise_z.get(), P, B, P, a.seed, a.offset);

  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    acc_t cf[kMaxGroup];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t r_begin = p * per_part, r_end = std::min(B, r_begin + per_part);
      acc_t* acc = accumulator(p);
      if (r_begin >= r_end) {
        std::fill(acc, acc + P, acc_t(0));
        continue;
      }
      for (int64_t r0 = r_begin; r0 < r_end; r0 += group) {
        const int64_t nr = std::min(group, r_end - r0);
        for (int64_t r = 0; r < nr; ++r) {
          cf[r] = row_coefficient<acc_t>(a, r0 + r, sum_squares(G + (r0 + r) * P, P, noise.slice(r0 + r)));
        }
        accumulate_rows<scalar_t>(acc, G + r0 * P, P, P, cf, nr, r0 == r_begin);
      }
    }
  });

  const int64_t nch = divup(P, kChunk);
  const int64_t finish_grain = std::max(divup(nch, threads), divup(kMinFinishColumns, kChunk));
  at::parallel_for(0, nch, finish_grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t col0 = c * kChunk, n = std::min(kChunk, P - col0);
      acc_t* out = grad + col0;
      for (int64_t p = 1; p < parts; ++p) {
        const acc_t* src = accumulator(p) + col0;
        for (int64_t i = 0; i < n; ++i) out[i] += src[i];
      }
      finish_columns(out, n, noise.column(col0), a.noise_std, a.denom);
    }
  });
}

template <typename scalar_t>
void fused_columns_schedule(const FusedCpuArgs& a, int64_t threads) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* G = static_cast<const scalar_t*>(a.grads);
  acc_t* grad = static_cast<acc_t*>(a.grad);
  const int64_t B = a.rows, P = a.cols;
  // Norm pieces: whole rows when there are enough rows for the threads (long streams), else pieces of
  // at least kNormChunk columns, about four per thread.
  const int64_t piece = std::max(kNormChunk, 64 * divup(divup(P, divup(4 * threads, B)), 64));
  const int64_t nn = divup(P, piece);
  std::vector<double> partial(static_cast<size_t>(B * nn));
  const auto noise_z = noise_buffer(a);
  const NoisePlan noise(noise_z.get(), P, B * nn, std::min(piece, P), a.seed, a.offset);
  // Region 1: (row, chunk) sums of squares, chunk-major so neighbouring tasks share a column range.
  at::parallel_for(0, B * nn, divup(B * nn, threads), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t c = idx / B, r = idx % B;
      const int64_t col0 = c * piece;
      partial[r * nn + c] = sum_squares(G + r * P + col0, std::min(piece, P - col0), noise.slice(idx));
    }
  });
  std::vector<acc_t> cf(static_cast<size_t>(B));
  for (int64_t r = 0; r < B; ++r) {
    double ss = 0.0;
    for (int64_t c = 0; c < nn; ++c) ss += partial[r * nn + c];
    cf[r] = row_coefficient<acc_t>(a, r, ss);
  }
  // Region 2: every row of a column chunk, in order, into the output chunk; then noise and 1/D.
  const int64_t nch = divup(P, kChunk);
  at::parallel_for(0, nch, divup(nch, threads), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t col0 = c * kChunk, n = std::min(kChunk, P - col0);
      accumulate_rows<scalar_t>(grad + col0, G + col0, P, n, cf.data(), B, true);
      finish_columns(grad + col0, n, noise.column(col0), a.noise_std, a.denom);
    }
  });
}

template <typename scalar_t>
void fused_step_impl(const FusedCpuArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = a.rows, P = a.cols;
  // Threads: at most one per kMinTaskBytes of gradients (tiny steps are not worth the fork/join).
  const int64_t work_bytes = B * P * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t threads = std::clamp<int64_t>(work_bytes / kMinTaskBytes, 1, std::max(1, at::get_num_threads()));
  const int64_t row_bytes = std::max<int64_t>(1, P * static_cast<int64_t>(sizeof(scalar_t)));
  const int64_t acc_bytes = P * static_cast<int64_t>(sizeof(acc_t));
  const int64_t budget = cpu_cache_budget(std::min(threads, B));
  const int64_t group = std::clamp<int64_t>((budget - acc_bytes) / row_bytes, 1, kMaxGroup);
  // "rows" reads each row from memory once, then again from cache with the accumulator (read and
  // written once per group); "columns" reads each row from memory twice. Cache traffic costs about a
  // quarter of memory traffic (Zen 4, docs/benchmarks.md), so "rows" wins while
  // row + 2·acc/group < 4·row, i.e. 2·acc < 3·group·row (not so for a bf16 row with 1-row groups).
  const bool rows_pay = 2 * acc_bytes < 3 * group * row_bytes;
  if (row_bytes + acc_bytes <= budget && rows_pay && (B >= threads || P <= kChunk)) {
    fused_rows_schedule<scalar_t>(a, std::min(threads, B), group, threads);
  } else {
    fused_columns_schedule<scalar_t>(a, threads);
  }
}

}  // namespace

void DEMEM_NORMALS_ENTRY(float* out, int64_t n, uint64_t seed, uint64_t block0) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
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

void DEMEM_FUSED_ENTRY(const FusedCpuArgs& args) {
  switch (args.kind) {
    case GradKind::kHalf:
      return fused_step_impl<c10::Half>(args);
    case GradKind::kBFloat16:
      return fused_step_impl<c10::BFloat16>(args);
    case GradKind::kFloat:
      return fused_step_impl<float>(args);
    case GradKind::kDouble:
      return fused_step_impl<double>(args);
  }
}

}  // namespace demem

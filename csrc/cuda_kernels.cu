// CUDA implementations of the DeMem operators (compiled only with DEMEM_WITH_CUDA).
//
// fused_step makes two passes over the per-sample gradients G [B, P]:
//   pass 1  row_sumsq_kernel: blocks over (row, column segment), sum of squares in float64 with a
//           block reduction; one partial per (row, segment).
//   prologue_kernel (one block): threshold τ, risk, weight, norm (sum of the partials), clip factor
//           and coefficient of every sample -> the weights/risk/norms/coeff outputs.
//   pass 2  weighted_sum_kernel: each thread owns 4 consecutive columns (one Philox block),
//           accumulates Σ_r coeff_r·G[r, cols] in the accumulation dtype, adds σ·C·ξ from the same
//           Philox stream as the CPU and divides by D, in the launch that writes the result. When P
//           is too small to fill the GPU, rows are split across blocks too and a small kernel sums
//           the row-split partials (a [splits, P] buffer, not G) and adds the noise.
// No fast math: the noise must match the CPU stream to float rounding.
// Only light CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which a
// minimal CUDA toolkit (nvcc + cudart) does not ship.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "demem_common.h"
#include "demem_cuda.h"

namespace demem {
namespace {

constexpr int kThreads = 256;
constexpr int kPrologueThreads = 1024;

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_double<double>(double x) {
  return x;
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  return static_cast<acc_t>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) {
  return x;
}

struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxOp {
  __device__ double operator()(double a, double b) const { return fmax(a, b); }
};

// `op` over the block (0 is its identity: a sum, or the maximum of values >= 0); every thread gets the
// result. `shared` holds at least 33 doubles.
template <typename Op>
__device__ double block_reduce(double v, double* shared, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, o));
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  const double total = shared[32];
  __syncthreads();  // `shared` may be reused after this
  return total;
}

__device__ double block_sum(double v, double* shared) { return block_reduce(v, shared, SumOp()); }
__device__ double block_max(double v, double* shared) { return block_reduce(v, shared, MaxOp()); }

// ------------------------------------------------------------------------------------------------
// Pass 1: sums of squares of (row, segment) pieces.
// ------------------------------------------------------------------------------------------------
template <typename scalar_t, bool kVec>
__global__ void row_sumsq_kernel(const scalar_t* __restrict__ g, int64_t P, int64_t seg, int64_t splits,
                                 double* __restrict__ partial) {
  __shared__ double shared[33];
  const int64_t bid = blockIdx.x;
  const int64_t row = bid / splits, split = bid % splits;
  const int64_t c0 = split * seg;
  const int64_t c1 = min(P, c0 + seg);
  const scalar_t* x = g + row * P;
  double acc0 = 0.0, acc1 = 0.0;
  if (kVec) {  // P % 4 == 0, seg % 4 == 0, rows aligned to 4 elements
    for (int64_t j = c0 + 4 * static_cast<int64_t>(threadIdx.x); j < c1; j += 4 * static_cast<int64_t>(blockDim.x)) {
      const Pack4<scalar_t> p = *reinterpret_cast<const Pack4<scalar_t>*>(x + j);
      const double a = to_double(p.v[0]), b = to_double(p.v[1]);
      const double c = to_double(p.v[2]), d = to_double(p.v[3]);
      acc0 = fma(a, a, acc0);
      acc1 = fma(b, b, acc1);
      acc0 = fma(c, c, acc0);
      acc1 = fma(d, d, acc1);
    }
  } else {
    for (int64_t j = c0 + threadIdx.x; j < c1; j += blockDim.x) {
      const double a = to_double(x[j]);
      acc0 = fma(a, a, acc0);
    }
  }
  const double total = block_sum(acc0 + acc1, shared);
  if (threadIdx.x == 0) partial[bid] = total;
}

// ------------------------------------------------------------------------------------------------
// Prologue: τ, risk, weight, norm, clip factor, coefficient (one block).
// ------------------------------------------------------------------------------------------------
template <typename out_t>
__global__ void prologue_kernel(const double* __restrict__ s, const double* __restrict__ sorted, int64_t B,
                                RiskRule rule, bool scores_fp64, const double* __restrict__ w_override,
                                const double* __restrict__ partial, int64_t splits, bool clip, double max_norm,
                                int scope, out_t* __restrict__ w_out, out_t* __restrict__ r_out,
                                out_t* __restrict__ n_out, out_t* __restrict__ c_out) {
  __shared__ double shared[33];
  double tau = rule.tau;
  if (rule.rule == kMean) {
    double local = 0.0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) local = fmax(local, fabs(s[i]));
    const int e = moment_exponent(block_max(local, shared));
    local = 0.0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) local += ldexp(s[i], -e);
    const double mean = block_sum(local, shared) / static_cast<double>(B);
    local = 0.0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
      const double d = ldexp(s[i], -e) - mean;
      local = fma(d, d, local);
    }
    tau = mean_threshold(mean, block_sum(local, shared), B, rule.k, e);
  } else if (rule.rule == kQuantile) {
    tau = quantile_sorted(sorted, B, rule.quantile);
  }
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    const double risk = risk_of(s[i], tau, rule.selection, rule.temperature);
    double w = round_to_output(weight_of(risk, rule.lam), scores_fp64);
    const double r = round_to_output(risk, scores_fp64);
    if (w_override != nullptr) w = w_override[i];
    w_out[i] = static_cast<out_t>(w);
    r_out[i] = static_cast<out_t>(r);
    if (partial != nullptr) {
      double ss = 0.0;
      for (int64_t k = 0; k < splits; ++k) ss += partial[i * splits + k];
      const double norm = sqrt(ss);
      const double c = clip_factor(norm, r, clip, max_norm, scope);
      n_out[i] = static_cast<out_t>(norm);
      c_out[i] = static_cast<out_t>(mul_rn(w, c));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Pass 2: column-parallel weighted sum, noise, division.
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ void finish_quad(acc_t a[4], int64_t quad, int m, acc_t* __restrict__ out,
                                            double noise_std, uint64_t seed, uint64_t offset, double denom) {
  const acc_t d = static_cast<acc_t>(denom);
  if (noise_std > 0) {
    float z[4];
    philox_normal4(offset + static_cast<uint64_t>(quad), seed, z);
    const acc_t sd = static_cast<acc_t>(noise_std);
#pragma unroll
    for (int l = 0; l < 4; ++l) a[l] = add_rn(a[l], mul_rn(sd, static_cast<acc_t>(z[l])));
  }
  const int64_t j0 = 4 * quad;
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l < m) out[j0 + l] = a[l] / d;
}

template <typename scalar_t, typename acc_t, bool kVec>
__global__ void weighted_sum_kernel(const scalar_t* __restrict__ g, int64_t B, int64_t P,
                                    const acc_t* __restrict__ coeff, int64_t rows_per_split,
                                    acc_t* __restrict__ split_out, acc_t* __restrict__ out, double noise_std,
                                    uint64_t seed, uint64_t offset, double denom) {
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j0 = 4 * quad;
  if (j0 >= P) return;
  const int m = static_cast<int>(P - j0 < 4 ? P - j0 : 4);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(B, r0 + rows_per_split);
  acc_t a[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  const scalar_t* x = g + r0 * P + j0;
  if (kVec) {
#pragma unroll 4
    for (int64_t r = r0; r < r1; ++r, x += P) {
      const Pack4<scalar_t> p = *reinterpret_cast<const Pack4<scalar_t>*>(x);
      const acc_t c = coeff[r];
#pragma unroll
      for (int l = 0; l < 4; ++l) a[l] = fma(c, to_acc<acc_t>(p.v[l]), a[l]);
    }
  } else {
    for (int64_t r = r0; r < r1; ++r, x += P) {
      const acc_t c = coeff[r];
      for (int l = 0; l < m; ++l) a[l] = fma(c, to_acc<acc_t>(x[l]), a[l]);
    }
  }
  if (split_out != nullptr) {
    acc_t* dst = split_out + static_cast<int64_t>(blockIdx.y) * P + j0;
    for (int l = 0; l < m; ++l) dst[l] = a[l];
    return;
  }
  finish_quad(a, quad, m, out, noise_std, seed, offset, denom);
}

template <typename acc_t>
__global__ void split_finish_kernel(const acc_t* __restrict__ split_out, int64_t splits, int64_t P,
                                    acc_t* __restrict__ out, double noise_std, uint64_t seed, uint64_t offset,
                                    double denom) {
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j0 = 4 * quad;
  if (j0 >= P) return;
  const int m = static_cast<int>(P - j0 < 4 ? P - j0 : 4);
  acc_t a[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t k = 0; k < splits; ++k)
    for (int l = 0; l < m; ++l) a[l] += split_out[k * P + j0 + l];
  finish_quad(a, quad, m, out, noise_std, seed, offset, denom);
}

__global__ void philox_normal_kernel(float* __restrict__ out, int64_t n, uint64_t seed, uint64_t offset) {
  const int64_t blocks = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks; b += stride) {
    float z[4];
    philox_normal4(offset + static_cast<uint64_t>(b), seed, z);
    const int64_t j0 = 4 * b;
    if (j0 + 4 <= n) {
      *reinterpret_cast<float4*>(out + j0) = make_float4(z[0], z[1], z[2], z[3]);
    } else {
      for (int64_t l = 0; j0 + l < n; ++l) out[j0 + l] = z[l];
    }
  }
}

int sm_count() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Scores as contiguous float64, and their ascending sort for the quantile rule.
std::pair<at::Tensor, at::Tensor> scores_f64(const at::Tensor& scores, const RiskRule& rule) {
  at::Tensor s = scores.to(at::kDouble).contiguous();
  at::Tensor sorted;
  if (rule.rule == kQuantile) sorted = std::get<0>(at::sort(s)).contiguous();
  return {s, sorted};
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weights_cuda(const at::Tensor& scores, const RiskRule& rule) {
  const c10::cuda::CUDAGuard guard(scores.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = scores.numel();
  const bool fp64 = scores.scalar_type() == at::kDouble;
  auto [s, sorted] = scores_f64(scores, rule);
  const auto opts = scores.options().dtype(fp64 ? at::kDouble : at::kFloat);
  at::Tensor w = at::empty({B}, opts), r = at::empty({B}, opts);
  if (fp64) {
    prologue_kernel<double><<<1, kPrologueThreads, 0, stream>>>(
        s.data_ptr<double>(), ptr_or_null<double>(sorted), B, rule, fp64, nullptr, nullptr, 1, false, 0.0,
        kScopeAll, w.data_ptr<double>(), r.data_ptr<double>(), nullptr, nullptr);
  } else {
    prologue_kernel<float><<<1, kPrologueThreads, 0, stream>>>(
        s.data_ptr<double>(), ptr_or_null<double>(sorted), B, rule, fp64, nullptr, nullptr, 1, false, 0.0,
        kScopeAll, w.data_ptr<float>(), r.data_ptr<float>(), nullptr, nullptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {w, r};
}

at::Tensor philox_normal_cuda(int64_t n, uint64_t seed, uint64_t offset, c10::Device device) {
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(device));
  const int64_t blocks = divup(n, 4);
  if (blocks == 0) return out;
  const int64_t grid = std::min<int64_t>(divup(blocks, kThreads), static_cast<int64_t>(sm_count()) * 32);
  philox_normal_kernel<<<static_cast<unsigned>(grid), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, seed, offset);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cuda(
    const at::Tensor& grads, const at::Tensor& scores, const std::optional<at::Tensor>& weights,
    const RiskRule& rule, bool clip, double max_norm, int scope, double noise_std, uint64_t seed,
    uint64_t offset, double denom) {
  const c10::cuda::CUDAGuard guard(grads.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor g = grads.contiguous();
  const int64_t B = g.size(0), P = g.size(1);
  const bool scores_fp64 = scores.scalar_type() == at::kDouble;
  auto [s, sorted] = scores_f64(scores, rule);
  at::Tensor w_override;
  if (weights.has_value()) w_override = weights->to(at::kDouble).contiguous();
  const at::ScalarType acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = g.options().dtype(acc);
  at::Tensor grad = at::empty({P}, opts);
  at::Tensor w_out = at::empty({B}, opts), r_out = at::empty({B}, opts);
  at::Tensor n_out = at::empty({B}, opts), c_out = at::empty({B}, opts);
  const int64_t sms = sm_count();

  // Pass 1 geometry: enough (row, segment) blocks to fill the GPU, segments of >= 8192 elements.
  int64_t splits = std::clamp<int64_t>(divup(4 * sms, B), 1, std::max<int64_t>(1, divup(P, 8192)));
  int64_t seg = std::max<int64_t>(4, divup(divup(P, splits), 4) * 4);
  splits = std::max<int64_t>(1, divup(P, seg));
  TORCH_CHECK(B * splits < (int64_t(1) << 31), "demem::fused_step: grads has too many rows (B = ", B, ")");
  at::Tensor partial = at::empty({B * splits}, g.options().dtype(at::kDouble));

  // Pass 2 geometry: one thread per 4 columns; split the rows too when that leaves the GPU idle.
  const int64_t quads = divup(P, 4);
  const int64_t col_blocks = std::max<int64_t>(1, divup(quads, kThreads));
  int64_t row_splits = std::clamp<int64_t>(divup(4 * sms, col_blocks), 1, std::max<int64_t>(1, divup(B, 64)));
  const int64_t rows_per_split = divup(B, row_splits);
  row_splits = divup(B, rows_per_split);
  TORCH_CHECK(col_blocks < (int64_t(1) << 31), "demem::fused_step: grads has too many columns (P = ", P, ")");

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "demem_fused_step_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const bool vec = P % 4 == 0 && reinterpret_cast<uintptr_t>(gp) % (4 * sizeof(scalar_t)) == 0;
    if (vec) {
      row_sumsq_kernel<scalar_t, true><<<static_cast<unsigned>(B * splits), kThreads, 0, stream>>>(
          gp, P, seg, splits, partial.data_ptr<double>());
    } else {
      row_sumsq_kernel<scalar_t, false><<<static_cast<unsigned>(B * splits), kThreads, 0, stream>>>(
          gp, P, seg, splits, partial.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prologue_kernel<acc_t><<<1, kPrologueThreads, 0, stream>>>(
        s.data_ptr<double>(), ptr_or_null<double>(sorted), B, rule, scores_fp64, ptr_or_null<double>(w_override),
        partial.data_ptr<double>(), splits, clip, max_norm, scope, w_out.data_ptr<acc_t>(), r_out.data_ptr<acc_t>(),
        n_out.data_ptr<acc_t>(), c_out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (P == 0) return;
    at::Tensor split_out;
    if (row_splits > 1) split_out = at::empty({row_splits * P}, opts);
    acc_t* split_ptr = row_splits > 1 ? split_out.data_ptr<acc_t>() : nullptr;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_splits));
    if (vec) {
      weighted_sum_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
          gp, B, P, c_out.data_ptr<acc_t>(), rows_per_split, split_ptr, grad.data_ptr<acc_t>(), noise_std, seed,
          offset, denom);
    } else {
      weighted_sum_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
          gp, B, P, c_out.data_ptr<acc_t>(), rows_per_split, split_ptr, grad.data_ptr<acc_t>(), noise_std, seed,
          offset, denom);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (row_splits > 1) {
      split_finish_kernel<acc_t><<<static_cast<unsigned>(col_blocks), kThreads, 0, stream>>>(
          split_ptr, row_splits, P, grad.data_ptr<acc_t>(), noise_std, seed, offset, denom);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad, w_out, r_out, n_out, c_out};
}

}  // namespace demem

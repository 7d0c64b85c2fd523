// The CUDA implementations (cuda_kernels.cu), declared for the registrations in demem.cpp.
// Only compiled with DEMEM_WITH_CUDA. Arguments are checked by the callers in demem.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "demem_common.h"

namespace demem {

// (weights, risk) in the accumulation dtype of scores.
std::tuple<at::Tensor, at::Tensor> weights_cuda(const at::Tensor& scores, const RiskRule& rule);

// n float32 normals on `device` (a CUDA device).
at::Tensor philox_normal_cuda(int64_t n, uint64_t seed, uint64_t offset, c10::Device device);

// (grad, weights, risk, norms, coeff) in the accumulation dtype of grads.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cuda(
    const at::Tensor& grads, const at::Tensor& scores, const std::optional<at::Tensor>& weights,
    const RiskRule& rule, bool clip, double max_norm, int scope, double noise_std, uint64_t seed,
    uint64_t offset, double denom);

}  // namespace demem

// demem_ext._C: the DeMem custom operators (torch.ops.demem.*), their CPU implementations, the
// registrations of the CUDA implementations (cuda_kernels.cu), and a small pybind11 module.
//
// Schemas: declared here once (TORCH_LIBRARY at the end of this file). demem_ext/ops/loader.py registers
// their fake kernels and, without this extension, defines the same ops with the reference as their kernel
// (tests/ops/test_schema.py compares the two). `seed` is the signed int64 with the unsigned seed's bits.
//
// philox_normal has no tensor argument, so the dispatcher cannot pick a backend from its inputs.
// It is registered once, as a CompositeExplicitAutograd kernel (the dispatcher uses it for every
// backend and for the empty key set of a tensor-less call), which branches on `device`.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "demem_common.h"
#include "demem_kernels.h"
#ifdef DEMEM_WITH_CUDA
#include "demem_cuda.h"
#endif

namespace demem {
namespace {

using at::Tensor;
using Tuple2 = std::tuple<Tensor, Tensor>;
using Tuple5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

RiskRule parse_rule(const char* op, double lam, c10::string_view selection, c10::string_view threshold,
                    double k, double quantile, double tau, double temperature) {
  RiskRule rule{lam, kHard, kMean, k, quantile, tau, temperature};
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, op, ": lam must be finite and >= 0, got ", lam);
  if (selection == "hard") {
    rule.selection = kHard;
  } else if (selection == "soft") {
    rule.selection = kSoft;
    TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
                ": temperature must be finite and > 0, got ", temperature);
  } else {
    TORCH_CHECK(false, op, ": selection must be 'hard' or 'soft', got '", std::string(selection), "'");
  }
  if (threshold == "mean") {
    rule.rule = kMean;
    TORCH_CHECK(std::isfinite(k), op, ": k must be finite, got ", k);
  } else if (threshold == "quantile") {
    rule.rule = kQuantile;
    TORCH_CHECK(quantile >= 0.0 && quantile <= 1.0, op, ": quantile must be in [0, 1], got ", quantile);
  } else if (threshold == "fixed") {
    rule.rule = kFixed;
    TORCH_CHECK(std::isfinite(tau), op, ": tau must be finite, got ", tau);
  } else {
    TORCH_CHECK(false, op, ": threshold must be 'mean', 'quantile' or 'fixed', got '", std::string(threshold),
                "'");
  }
  return rule;
}

void check_scores(const char* op, const char* name, const Tensor& t, int64_t batch = -1) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D [B], got shape ", t.sizes());
  TORCH_CHECK(t.numel() > 0, op, ": ", name, " is empty (B = 0)");
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  if (batch >= 0) {
    TORCH_CHECK(t.size(0) == batch, op, ": ", name, " has ", t.size(0), " entries but grads has B = ", batch,
                " rows");
  }
}

struct StepArgs {
  RiskRule rule;
  bool clip;
  double max_norm;
  int scope;
  double noise_std;
  uint64_t seed;
  uint64_t offset;
  double denom;
};

StepArgs check_fused(const Tensor& grads, const Tensor& scores, const std::optional<Tensor>& weights,
                     double lam, c10::string_view selection, c10::string_view threshold, double k,
                     double quantile, double tau, double temperature, std::optional<double> max_grad_norm,
                     double noise_multiplier, c10::string_view clip_scope, double denom, int64_t seed,
                     int64_t offset) {
  const char* op = "demem::fused_step";
  TORCH_CHECK(grads.defined(), op, ": grads is undefined");
  TORCH_CHECK(grads.dim() == 2, op, ": grads must be 2-D [B, P], got shape ", grads.sizes());
  TORCH_CHECK(grads.size(0) > 0, op, ": grads is empty (B = 0)");
  TORCH_CHECK(is_float_dtype(grads.scalar_type()), op,
              ": grads must be float16, bfloat16, float32 or float64, got ", grads.scalar_type());
  check_scores(op, "scores", scores, grads.size(0));
  TORCH_CHECK(scores.device() == grads.device(), op, ": scores is on ", scores.device(), " but grads is on ",
              grads.device());
  if (weights.has_value()) {
    check_scores(op, "weights", *weights, grads.size(0));
    TORCH_CHECK(weights->device() == grads.device(), op, ": weights is on ", weights->device(),
                " but grads is on ", grads.device());
  }
  StepArgs a{};
  a.rule = parse_rule(op, lam, selection, threshold, k, quantile, tau, temperature);
  a.clip = max_grad_norm.has_value();
  a.max_norm = a.clip ? *max_grad_norm : 0.0;
  if (a.clip) {
    TORCH_CHECK(std::isfinite(a.max_norm) && a.max_norm > 0, op, ": max_grad_norm must be finite and > 0, got ",
                a.max_norm);
  }
  TORCH_CHECK(std::isfinite(noise_multiplier) && noise_multiplier >= 0, op,
              ": noise_multiplier must be finite and >= 0, got ", noise_multiplier);
  if (clip_scope == "all") {
    a.scope = kScopeAll;
  } else if (clip_scope == "high_risk") {
    a.scope = kScopeHighRisk;
  } else {
    TORCH_CHECK(false, op, ": clip_scope must be 'all' or 'high_risk', got '", std::string(clip_scope), "'");
  }
  TORCH_CHECK(std::isfinite(denom) && denom > 0, op, ": denom must be finite and > 0, got ", denom);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  a.noise_std = noise_multiplier * (a.clip ? a.max_norm : 1.0);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  a.denom = denom;
  return a;
}

// Threshold τ of float64 scores (host).
double threshold_cpu(const double* s, int64_t n, const RiskRule& rule) {
  if (rule.rule == kFixed) return rule.tau;
  if (rule.rule == kQuantile) {
    std::vector<double> sorted(s, s + n);
    std::sort(sorted.begin(), sorted.end());
    return quantile_sorted(sorted.data(), n, rule.quantile);
  }
  double max_abs = 0.0;
  for (int64_t i = 0; i < n; ++i) max_abs = std::max(max_abs, std::fabs(s[i]));
  const int e = moment_exponent(max_abs);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::ldexp(s[i], -e);
  const double mean = sum / static_cast<double>(n);
  double sq = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::ldexp(s[i], -e) - mean;
    sq += d * d;
  }
  return mean_threshold(mean, sq, n, rule.k, e);
}

// w_i and r_i in float64, rounded as the reference rounds them (to float32 unless scores is float64).
void risk_weights_cpu(const Tensor& scores, const RiskRule& rule, std::vector<double>& w, std::vector<double>& r) {
  const Tensor s = scores.to(at::kDouble).contiguous();
  const double* sp = s.data_ptr<double>();
  const int64_t n = s.numel();
  const bool fp64 = scores.scalar_type() == at::kDouble;
  const double tau = threshold_cpu(sp, n, rule);
  w.resize(n);
  r.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const double risk = risk_of(sp[i], tau, rule.selection, rule.temperature);
    w[i] = round_to_output(weight_of(risk, rule.lam), fp64);
    r[i] = round_to_output(risk, fp64);
  }
}

Tensor vector_to_tensor(const std::vector<double>& v, at::ScalarType dtype) {
  return at::from_blob(const_cast<double*>(v.data()), {static_cast<int64_t>(v.size())}, at::kDouble)
      .to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

// ------------------------------------------------------------------------------------------------
// demem::weights
// ------------------------------------------------------------------------------------------------
Tuple2 weights_cpu(const Tensor& scores, double lam, c10::string_view selection, c10::string_view threshold,
                   double k, double quantile, double tau, double temperature) {
  const char* op = "demem::weights";
  check_scores(op, "scores", scores);
  const RiskRule rule = parse_rule(op, lam, selection, threshold, k, quantile, tau, temperature);
  std::vector<double> w, r;
  risk_weights_cpu(scores, rule, w, r);
  const auto out = accumulation_dtype(scores.scalar_type());
  return {vector_to_tensor(w, out), vector_to_tensor(r, out)};
}

#ifdef DEMEM_WITH_CUDA
Tuple2 weights_cuda_op(const Tensor& scores, double lam, c10::string_view selection, c10::string_view threshold,
                       double k, double quantile, double tau, double temperature) {
  const char* op = "demem::weights";
  check_scores(op, "scores", scores);
  const RiskRule rule = parse_rule(op, lam, selection, threshold, k, quantile, tau, temperature);
  return weights_cuda(scores, rule);
}
#endif

// ------------------------------------------------------------------------------------------------
// demem::philox_normal
// ------------------------------------------------------------------------------------------------
Tensor philox_normal_op(int64_t n, int64_t seed, int64_t offset, c10::Device device) {
  const char* op = "demem::philox_normal";
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  TORCH_CHECK(offset >= 0, op, ": offset must be >= 0, got ", offset);
  if (device.is_cuda()) {
#ifdef DEMEM_WITH_CUDA
    return philox_normal_cuda(n, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), device);
#endif
  }
  TORCH_CHECK(device.is_cpu() || device.is_cuda(), op, ": device must be cpu or cuda, got ", device);
  Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  philox_normal_cpu_kernel(out.data_ptr<float>(), n, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset));
  return device.is_cuda() ? out.to(device) : out;  // built without CUDA kernels: the CPU stream, moved
}

// ------------------------------------------------------------------------------------------------
// demem::fused_step
// ------------------------------------------------------------------------------------------------
GradKind grad_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return GradKind::kHalf;
    case at::kBFloat16:
      return GradKind::kBFloat16;
    case at::kFloat:
      return GradKind::kFloat;
    default:
      return GradKind::kDouble;
  }
}

Tuple5 fused_step_cpu(const Tensor& grads, const Tensor& scores, const std::optional<Tensor>& weights,
                      double lam, c10::string_view selection, c10::string_view threshold, double k,
                      double quantile, double tau, double temperature, std::optional<double> max_grad_norm,
                      double noise_multiplier, c10::string_view clip_scope, double denom, int64_t seed,
                      int64_t offset) {
  const StepArgs a = check_fused(grads, scores, weights, lam, selection, threshold, k, quantile, tau,
                                 temperature, max_grad_norm, noise_multiplier, clip_scope, denom, seed, offset);
  const Tensor g = grads.contiguous();
  const int64_t B = g.size(0), P = g.size(1);
  std::vector<double> w, r;
  risk_weights_cpu(scores, a.rule, w, r);
  if (weights.has_value()) {
    const Tensor wo = weights->to(at::kDouble).contiguous();
    std::copy(wo.data_ptr<double>(), wo.data_ptr<double>() + B, w.begin());
  }
  const auto acc = accumulation_dtype(g.scalar_type());
  const auto opts = g.options().dtype(acc);
  Tensor grad = at::empty({P}, opts);
  Tensor norms = at::empty({B}, opts);
  Tensor coeff = at::empty({B}, opts);

  FusedCpuArgs args{};
  args.grads = g.data_ptr();
  args.kind = grad_kind(g.scalar_type());
  args.rows = B;
  args.cols = P;
  args.weights = w.data();
  args.risk = r.data();
  args.clip = a.clip;
  args.max_norm = a.max_norm;
  args.scope = a.scope;
  args.noise_std = a.noise_std;
  args.seed = a.seed;
  args.offset = a.offset;
  args.denom = a.denom;
  args.grad = grad.data_ptr();
  args.norms = norms.data_ptr();
  args.coeff = coeff.data_ptr();
  fused_step_cpu_kernel(args);
  return {grad, vector_to_tensor(w, acc), vector_to_tensor(r, acc), norms, coeff};
}

#ifdef DEMEM_WITH_CUDA
Tuple5 fused_step_cuda_op(const Tensor& grads, const Tensor& scores, const std::optional<Tensor>& weights,
                          double lam, c10::string_view selection, c10::string_view threshold, double k,
                          double quantile, double tau, double temperature, std::optional<double> max_grad_norm,
                          double noise_multiplier, c10::string_view clip_scope, double denom, int64_t seed,
                          int64_t offset) {
  const StepArgs a = check_fused(grads, scores, weights, lam, selection, threshold, k, quantile, tau,
                                 temperature, max_grad_norm, noise_multiplier, clip_scope, denom, seed, offset);
  return fused_step_cuda(grads, scores, weights, a.rule, a.clip, a.max_norm, a.scope, a.noise_std, a.seed,
                         a.offset, a.denom);
}
#endif

}  // namespace
}  // namespace demem

TORCH_LIBRARY(demem, m) {
  m.def(
      "weights(Tensor scores, float lam, str selection, str threshold, float k, float quantile, float tau, "
      "float temperature) -> (Tensor weights, Tensor risk)");
  m.def("philox_normal(int n, int seed, int offset, Device device) -> Tensor");
  m.def(
      "fused_step(Tensor grads, Tensor scores, Tensor? weights, float lam, str selection, str threshold, "
      "float k, float quantile, float tau, float temperature, float? max_grad_norm, float noise_multiplier, "
      "str clip_scope, float denom, int seed, int offset) -> (Tensor grad, Tensor weights, Tensor risk, "
      "Tensor norms, Tensor coeff)");
}

TORCH_LIBRARY_IMPL(demem, CPU, m) {
  m.impl("weights", &demem::weights_cpu);
  m.impl("fused_step", &demem::fused_step_cpu);
}

TORCH_LIBRARY_IMPL(demem, CompositeExplicitAutograd, m) { m.impl("philox_normal", &demem::philox_normal_op); }

#ifdef DEMEM_WITH_CUDA
TORCH_LIBRARY_IMPL(demem, CUDA, m) {
  m.impl("weights", &demem::weights_cuda_op);
  m.impl("fused_step", &demem::fused_step_cuda_op);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "demem_ext._C: DeMem custom operators (torch.ops.demem.*) with CPU and CUDA kernels";
  m.def(
      "with_cuda",
      []() {
#ifdef DEMEM_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA kernels were compiled into this extension.");
  m.def(
      "cpu_capability", []() { return std::string(demem::cpu_kernel_capability()); },
      "The instruction set of the fused CPU kernel in use: 'avx512', 'avx2' or 'default' "
      "(ATEN_CPU_CAPABILITY=avx2 or default caps it, as for ATen's own kernels).");
  m.def(
      "cpu_cache_bytes", []() { return demem::cpu_last_level_cache_bytes(); },
      "The last-level cache in bytes behind the CPU schedule's cache budget: cpu0's highest-level cache "
      "in sysfs, else glibc's sysconf (DEMEM_CPU_CACHE_BYTES overrides the budget, not this).");
  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        uint32_t c[4] = {c0, c1, c2, c3};
        demem::philox4x32_10(c, k0, k1);
        return std::make_tuple(c[0], c[1], c[2], c[3]);
      },
      "The raw Philox4x32-10 block function of the kernels: (ctr0..ctr3, key0, key1) -> 4 words.",
      pybind11::arg("c0"), pybind11::arg("c1"), pybind11::arg("c2"), pybind11::arg("c3"), pybind11::arg("k0"),
      pybind11::arg("k1"));
}

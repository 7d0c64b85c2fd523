// The two passes of the fused CPU step's "columns" schedule as ops, so that the benchmark can time
// each against the torch op that does the same work (vector_norm, mv), in the same run:
//   demem::cpu_fused_pass(Tensor grads, Tensor coeff, str which) -> Tensor
//   pass "norms":      the row norms [B] (sums of squares as in the step, the rows side by side that a
//                      step on this shape reads (cpu_norm_rows), with the normals of σ = 1 drawn during
//                      the sweeps, as in the step); coeff is not read
//   pass "accumulate": coeffᵀG [P] (coeff [B] in the accumulation dtype)
// Outputs in the accumulation dtype (float64 for float64 gradients, float32 otherwise).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu_schedule.h"

namespace demem {
namespace {

at::Tensor cpu_fused_pass(const at::Tensor& grads, const at::Tensor& coeff, c10::string_view pass) {
  TORCH_CHECK(grads.device().is_cpu() && grads.dim() == 2, "demem::cpu_fused_pass: grads must be a CPU [B, P]");
  TORCH_CHECK(pass == "norms" || pass == "accumulate", "demem::cpu_fused_pass: pass must be norms or accumulate");
  const at::Tensor g = grads.contiguous();
  const auto t = g.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "demem::cpu_fused_pass: floating-point grads only");
  const auto acc = t == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = g.size(0), P = g.size(1);
  const at::Tensor c = coeff.to(acc).contiguous();
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B, "demem::cpu_fused_pass: coeff must be [B]");
  const std::vector<double> ones(static_cast<size_t>(B), 1.0), zeros(static_cast<size_t>(B), 0.0);
  at::Tensor grad = at::empty({P}, g.options().dtype(acc));
  at::Tensor norms = at::empty({B}, g.options().dtype(acc));
  at::Tensor cf = at::empty({B}, g.options().dtype(acc));
  FusedCpuArgs a{};
  a.grads = g.data_ptr();
  a.kind = t == at::kHalf ? GradKind::kHalf
                          : (t == at::kBFloat16 ? GradKind::kBFloat16 : (t == at::kFloat ? GradKind::kFloat : GradKind::kDouble));
  a.rows = B;
  a.cols = P;
  a.weights = ones.data();
  a.risk = zeros.data();
  a.clip = false;
  a.max_norm = 1.0;
  a.scope = kScopeAll;
  a.noise_std = pass == "norms" ? 1.0 : 0.0;
  a.denom = 1.0;
  a.grad = grad.data_ptr();
  a.norms = norms.data_ptr();
  a.coeff = pass == "norms" ? cf.data_ptr() : const_cast<void*>(c.data_ptr());
  if (pass == "norms") {
    run_pass_cpu(a, CpuPass::kNorms, cpu_norm_rows(a));
  } else {
    run_pass_cpu(a, CpuPass::kAccumulate, kMaxNormRows);  // the accumulate pass reads no norms
  }
  return pass == "norms" ? norms : grad;
}

}  // namespace
}  // namespace demem

TORCH_LIBRARY_FRAGMENT(demem, m) {
  m.def("cpu_fused_pass(Tensor grads, Tensor coeff, str which) -> Tensor", &demem::cpu_fused_pass);
}

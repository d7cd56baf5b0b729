// Host side of inner_step on CUDA: checks, allocation, the launch on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "host_common.h"
#include "inner_step.cuh"

namespace fastmeta {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// inner_step
// ---------------------------------------------------------------------------------------

StepCoef make_coef(const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments) {
  return StepCoef{lr.data_ptr<float>(), segments.has_value() ? segments->data_ptr<int64_t>() : nullptr,
                  mask.has_value() ? mask->data_ptr<float>() : nullptr,
                  precond.has_value() ? precond->data_ptr<float>() : nullptr, lr.dim() == 0};
}

void check_step(const at::Tensor& grad, const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments) {
  FM_CHECK_CUDA_F32(grad);
  FM_CHECK_DIM(grad, 2);
  FM_CHECK_CUDA_F32(lr);
  const int64_t P = grad.size(1);
  for (const auto* o : {&mask, &precond})
    if (o->has_value()) {
      FM_CHECK_CUDA_F32(**o);
      TORCH_CHECK_VALUE((*o)->dim() == 1 && (*o)->size(0) == P, "mask/precond must be [P] = [", P, "]");
    }
  if (segments.has_value()) {
    // Segment indices are trusted to lie in [0, S): validating them would cost a device
    // sync per step; the op layer builds them from the model's layout.
    FM_CHECK_INPUT(*segments, kCUDA);
    TORCH_CHECK_TYPE(segments->scalar_type() == at::kLong, "segments must be int64, got ", segments->scalar_type());
    TORCH_CHECK_VALUE(segments->dim() == 1 && segments->size(0) == P, "segments must be [P] = [", P, "], got ",
                      segments->sizes());
    TORCH_CHECK_VALUE(lr.dim() == 1, "per-segment lr must be [S], got ", lr.sizes());
    // The backward sums per-segment rates in shared memory: 12288 floats = 48 KiB.
    TORCH_CHECK_NOT_IMPLEMENTED(lr.size(0) <= 12288, "per-segment lr must be [S] with S <= 12288 on CUDA, got ",
                                lr.sizes());
  } else {
    TORCH_CHECK_VALUE(lr.dim() == 0 || (lr.dim() == 1 && lr.size(0) == P), "lr must be a scalar or [P] without segments");
  }
}

at::Tensor inner_step(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                      const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& precond,
                      const c10::optional<at::Tensor>& segments) {
  check_step(grad, lr, mask, precond, segments);
  FM_CHECK_CUDA_F32(theta);
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool shared = theta.dim() == 1;
  TORCH_CHECK_VALUE(shared ? theta.size(0) == P : theta.sizes() == grad.sizes(), "theta must be [P] or [T, P] like grad");
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  if (out.numel() == 0) return out;
  launch_inner_step(theta.data_ptr<float>(), shared, grad.data_ptr<float>(), make_coef(lr, mask, precond, segments),
                    T, P, out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> inner_step_backward(const at::Tensor& grad_out, const at::Tensor& grad, const at::Tensor& lr,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& precond,
                                            const c10::optional<at::Tensor>& segments, bool theta_shared,
                                            const c10::List<bool>& needs) {
  check_step(grad, lr, mask, precond, segments);
  FM_CHECK_CUDA_F32(grad_out);
  TORCH_CHECK_VALUE(grad_out.sizes() == grad.sizes(), "grad_out must be like grad");
  TORCH_CHECK_VALUE(needs.size() == 5, "needs must hold 5 flags");
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool nt = needs.get(0), ng = needs.get(1), nl = needs.get(2);
  const bool nm = needs.get(3) && mask.has_value(), np = needs.get(4) && precond.has_value();
  c10::cuda::CUDAGuard guard(grad.device());
  auto empty = [&] { return at::empty({0}, grad.options()); };
  at::Tensor d_theta = nt ? (theta_shared ? at::empty({P}, grad.options()) : at::empty_like(grad)) : empty();
  at::Tensor d_grad = ng ? at::empty_like(grad) : empty();
  at::Tensor d_lr = nl ? at::zeros(lr.sizes(), lr.options()) : empty();
  at::Tensor d_mask = nm ? at::empty({P}, grad.options()) : empty();
  at::Tensor d_precond = np ? at::empty({P}, grad.options()) : empty();
  if (P > 0 && (nt || ng || nl || nm || np)) {
    const bool reduce_lr = nl && (lr.dim() == 0 || segments.has_value());
    const int64_t S = lr.dim() == 0 ? 1 : lr.size(0);
    launch_inner_step_backward(grad_out.data_ptr<float>(), grad.data_ptr<float>(),
                               make_coef(lr, mask, precond, segments), T, P, S, theta_shared,
                               nt ? d_theta.data_ptr<float>() : nullptr, ng ? d_grad.data_ptr<float>() : nullptr,
                               nl ? d_lr.data_ptr<float>() : nullptr, nm ? d_mask.data_ptr<float>() : nullptr,
                               np ? d_precond.data_ptr<float>() : nullptr, reduce_lr, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (nt && theta_shared) {
    d_theta.zero_();
  }
  return {d_theta, d_grad, d_lr, d_mask, d_precond};
}

}  // namespace

}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("inner_step", &fastmeta::cuda::inner_step);
  m.impl("inner_step_backward", &fastmeta::cuda::inner_step_backward);
}

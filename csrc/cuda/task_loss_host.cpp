// Host side of task_loss, task_loss_grad and task_loss_grad_backward on CUDA.
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
#include "task_loss.cuh"

namespace fastmeta {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// task_loss
// ---------------------------------------------------------------------------------------

void check_loss(const at::Tensor& pred, const at::Tensor& target, LossKind kind) {
  FM_CHECK_CUDA_F32(pred);
  FM_CHECK_INPUT(target, kCUDA);
  TORCH_CHECK_VALUE(pred.dim() >= 2 && pred.size(0) > 0, "pred must be [T, N, ...]");
  if (kind == LossKind::CrossEntropy) {
    FM_CHECK_DIM(pred, 3);
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "cross-entropy target must be int64, got ",
                     target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                      "cross-entropy target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ",
                      target.sizes());
    TORCH_CHECK_VALUE(pred.size(2) > 0, "cross-entropy needs at least one class");
  } else {
    TORCH_CHECK_TYPE(target.scalar_type() == at::kFloat, "MSE target must be float32, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "MSE target must be ", pred.sizes(), ", got ", target.sizes());
  }
}

at::Tensor task_loss(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor out = at::empty({T}, pred.options());
  launch_task_loss(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(kind), T, N, C, M,
                   out.data_ptr<float>(), nullptr, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// The cross-entropy task_loss and task_accuracy in one launch (task_loss_kernel writing both).
std::tuple<at::Tensor, at::Tensor> task_loss_and_accuracy(const at::Tensor& pred, const at::Tensor& target) {
  check_loss(pred, target, LossKind::CrossEntropy);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), C = pred.size(2);
  at::Tensor loss = at::empty({T}, pred.options());
  at::Tensor accuracy = at::empty({T}, pred.options());
  launch_task_loss(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(LossKind::CrossEntropy), T, N, C,
                   N * C, loss.data_ptr<float>(), accuracy.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, accuracy};
}

// scale: a [T] float32 on pred's device (task stride 0 or 1) multiplying each task's
// gradient, read in the kernel (no host read: capturable), or none.
at::Tensor task_loss_grad(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name,
                          const c10::optional<at::Tensor>& scale) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const bool scaled = scale.has_value() && scale->defined();
  if (scaled) {
    FM_CHECK_INPUT(*scale, kCUDA);
    TORCH_CHECK_VALUE(scale->scalar_type() == at::kFloat && scale->device() == pred.device() && scale->dim() == 1 &&
                          scale->size(0) == T && (T <= 1 || scale->stride(0) == 0 || scale->stride(0) == 1),
                      "task_loss_grad: scale must be a float32 [T] = [", T, "] on pred's device at a task stride of "
                      "0 or 1, got ", scale->sizes(), " with strides ", scale->strides());
  }
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor out = at::empty_like(pred);
  if (out.numel() == 0) return out;
  launch_task_loss_grad(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(kind), T, N, C, M,
                        scaled ? scale->data_ptr<float>() : nullptr, scaled && T > 1 ? scale->stride(0) : 0,
                        out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// task_loss and task_loss_grad from one launch (task_loss_and_grad_kernel).
std::tuple<at::Tensor, at::Tensor> task_loss_and_grad(const at::Tensor& pred, const at::Tensor& target,
                                                      c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor loss = at::empty({T}, pred.options());
  at::Tensor grad = at::empty_like(pred);
  launch_task_loss_and_grad(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(kind), T, N, C, M,
                            loss.data_ptr<float>(), grad.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

at::Tensor task_loss_grad_backward(const at::Tensor& upstream, const at::Tensor& pred, const at::Tensor& target,
                                   c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  FM_CHECK_CUDA_F32(upstream);
  TORCH_CHECK_VALUE(upstream.sizes() == pred.sizes(), "upstream must be ", pred.sizes(), ", got ", upstream.sizes());
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor out = at::empty_like(pred);
  if (out.numel() == 0) return out;
  launch_task_loss_grad_backward(upstream.data_ptr<float>(), pred.data_ptr<float>(), static_cast<int>(kind), T, N,
                                 C, M, out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor task_accuracy(const at::Tensor& pred, const at::Tensor& target) {
  FM_CHECK_CUDA_F32(pred);
  FM_CHECK_DIM(pred, 3);
  FM_CHECK_INPUT(target, kCUDA);
  TORCH_CHECK_VALUE(pred.size(2) > 0, "pred must have at least one class, got ", pred.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                    "target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ", target.sizes());
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), C = pred.size(2);
  at::Tensor out = at::empty({T}, pred.options());
  if (T == 0) return out;
  launch_task_accuracy(pred.data_ptr<float>(), target.data_ptr<int64_t>(), T, N, C, out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("task_loss", &fastmeta::cuda::task_loss);
  m.impl("task_loss_grad", &fastmeta::cuda::task_loss_grad);
  m.impl("task_loss_grad_backward", &fastmeta::cuda::task_loss_grad_backward);
  m.impl("task_accuracy", &fastmeta::cuda::task_accuracy);
  m.impl("task_loss_and_accuracy", &fastmeta::cuda::task_loss_and_accuracy);
  m.impl("task_loss_and_grad", &fastmeta::cuda::task_loss_and_grad);
}

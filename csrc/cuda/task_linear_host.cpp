// Host side of the task_linear family on CUDA: checks, allocation, the batched GEMM launch.
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
#include "task_linear.cuh"

namespace fastmeta {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// task_linear family
// ---------------------------------------------------------------------------------------

void gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C, const float* bias,
          int64_t bias_b, int act, float slope) {
  TORCH_CHECK_NOT_IMPLEMENTED(batches <= 65535, "at most 65535 tasks per launch (grid z), got ", batches);
  TORCH_CHECK_NOT_IMPLEMENTED((M + 31) / 32 <= 65535, "at most 65535·32 rows per task, got ", M);
  launch_batched_gemm(batches, M, N, K, A, B, C, bias, bias_b, act, slope, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor task_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       c10::string_view act_name, double negative_slope) {
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(x, 3);
  FM_CHECK_CUDA_F32(w);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK_VALUE(w.size(-1) == I, "w must have ", I, " input features, got ", w.sizes());
  const int64_t O = w.size(-2);
  int64_t bias_b = 0;
  if (b.has_value()) {
    FM_CHECK_CUDA_F32(*b);
    TORCH_CHECK_VALUE((b->dim() == 1 && b->size(0) == O) || (b->dim() == 2 && b->size(0) == T && b->size(1) == O),
                "b must be [O] or [T, O]");
    bias_b = b->dim() == 2 ? O : 0;
  }
  const int act = static_cast<int>(parse_act(std::string(act_name.data(), act_name.size())));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({T, N, O}, x.options());
  if (y.numel() == 0) return y;
  // B[k = i, n = o] = w[o, i]; a shared w has batch stride 0.
  gemm(T, N, O, I, Strided{x.data_ptr<float>(), N * I, I, 1},
       Strided{w.data_ptr<float>(), w.dim() == 2 ? 0 : O * I, 1, I}, y.data_ptr<float>(),
       b.has_value() ? b->data_ptr<float>() : nullptr, bias_b, act, static_cast<float>(negative_slope));
  return y;
}

at::Tensor task_linear_input_grad(const at::Tensor& grad_out, const at::Tensor& w) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_CUDA_F32(w);
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK_VALUE(w.size(-2) == O, "w must have ", O, " output features");
  const int64_t I = w.size(-1);
  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor out = at::empty({T, N, I}, grad_out.options());
  if (out.numel() == 0) return out;
  gemm(T, N, I, O, Strided{grad_out.data_ptr<float>(), N * O, O, 1},
       Strided{w.data_ptr<float>(), w.dim() == 2 ? 0 : O * I, I, 1}, out.data_ptr<float>(), nullptr, 0,
       static_cast<int>(Act::None), 0.f);
  return out;
}

at::Tensor task_linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), O = grad_out.size(2);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == N, "grad_out must be [T, N, O] like x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = shared ? at::empty({O, I}, x.options()) : at::empty({T, O, I}, x.options());
  if (out.numel() == 0) return out;
  const int none = static_cast<int>(Act::None);
  // A[m = o, k = n] = grad_out[n, o]; shared: the task and example dims merged (K = T·N).
  if (shared)
    gemm(1, O, I, T * N, Strided{grad_out.data_ptr<float>(), 0, 1, O}, Strided{x.data_ptr<float>(), 0, I, 1},
         out.data_ptr<float>(), nullptr, 0, none, 0.f);
  else
    gemm(T, O, I, N, Strided{grad_out.data_ptr<float>(), N * O, 1, O}, Strided{x.data_ptr<float>(), N * I, I, 1},
         out.data_ptr<float>(), nullptr, 0, none, 0.f);
  return out;
}

}  // namespace

}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("task_linear", &fastmeta::cuda::task_linear);
  m.impl("task_linear_input_grad", &fastmeta::cuda::task_linear_input_grad);
  m.impl("task_linear_weight_grad", &fastmeta::cuda::task_linear_weight_grad);
}

// Host side of the fused MLP meta-step on CUDA: checks, the shared-memory limit, the launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../mlp_meta_step_entry.h"
#include "host_common.h"
#include "mlp_meta_step.cuh"

namespace fastmeta {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// mlp_meta_step
// ---------------------------------------------------------------------------------------

// The kernel's dimensions of an MLP with these layer sizes (checked).
MlpDims mlp_dims(at::IntArrayRef layer_sizes) {
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK_NOT_IMPLEMENTED(L >= 1 && L <= kMaxLayers, "mlp_meta_step on CUDA takes 1 to ", kMaxLayers, " layers, got ", L);
  const int64_t O = layer_sizes.back();
  MlpDims d{};
  d.L = static_cast<int>(L);
  for (int64_t l = 0; l <= L; ++l) {
    TORCH_CHECK_VALUE(layer_sizes[l] >= 1, "layer sizes must be >= 1, got ", layer_sizes);
    TORCH_CHECK_NOT_IMPLEMENTED(layer_sizes[l] <= 65536, "mlp_meta_step on CUDA takes layer sizes up to 65536, got ",
                                layer_sizes);
    d.n[l] = static_cast<int>(layer_sizes[l]);
  }
  int64_t P = 0, cum = 0;
  for (int64_t l = 0; l < L; ++l) {
    d.offW[l] = static_cast<int>(P);
    P += layer_sizes[l + 1] * layer_sizes[l];
    d.offB[l] = static_cast<int>(P);
    P += layer_sizes[l + 1];
    TORCH_CHECK_NOT_IMPLEMENTED(P < (int64_t(1) << 30), "too many parameters for the fused kernel (2^30 at most)");
  }
  d.cum[0] = d.cum[1] = 0;
  for (int64_t l = 1; l <= L; ++l) {
    cum += layer_sizes[l];
    d.cum[l + 1] = static_cast<int>(cum);
  }
  d.P = static_cast<int>(P);
  d.Hs = static_cast<int>(cum);
  d.Es = static_cast<int>(cum - O);
  d.nmax = 0;
  for (int64_t l = 0; l <= L; ++l) d.nmax = std::max(d.nmax, d.n[l]);
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step(
    const at::Tensor& theta, at::IntArrayRef layer_sizes, c10::string_view act_name, double negative_slope,
    const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    c10::string_view loss_name, const at::Tensor& lr, int64_t steps, bool first_order, int64_t grads,
    const c10::optional<at::Tensor>& loss_weights, int64_t* nonfinite) {
  // nonfinite: on CUDA the checks would sync the device; the learners run them with torch
  // ops before this when asked, and a bad label becomes a NaN loss in the kernel.
  (void)nonfinite;
  for (const at::Tensor* t : {&theta, &support_x, &support_y, &query_x, &query_y, &lr}) {
    FM_CHECK_INPUT(*t, kCUDA);
    TORCH_CHECK_VALUE(t->device() == theta.device(), "all inputs must be on ", theta.device());
  }
  for (const at::Tensor* t : {&theta, &support_x, &query_x, &lr})
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "mlp_meta_step on CUDA takes float32, got ", t->scalar_type());
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  // The kernel relies on nothing padding-related, but only these have f'' written out.
  TORCH_CHECK_NOT_IMPLEMENTED(act != Act::Sigmoid, "mlp_meta_step: act must be relu, leaky_relu, tanh or none");
  const LossKind loss = parse_loss(std::string(loss_name.data(), loss_name.size()));
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK_NOT_IMPLEMENTED(L >= 1 && L <= kMaxLayers, "mlp_meta_step on CUDA takes 1 to ", kMaxLayers,
                              " layers, got ", L);
  TORCH_CHECK_VALUE(steps >= 0 && grads >= 0 && grads <= 2, "steps must be >= 0 and grads 0, 1 or 2");
  FM_CHECK_DIM(support_x, 3);
  FM_CHECK_DIM(query_x, 3);
  const int64_t T = support_x.size(0), K = support_x.size(1), Q = query_x.size(1), O = layer_sizes.back();
  TORCH_CHECK_VALUE(T >= 1 && K >= 1 && Q >= 1 && query_x.size(0) == T, "need T, K, Q >= 1 and query_x [T, Q, I]");
  TORCH_CHECK_NOT_IMPLEMENTED(T <= 2147483647LL, "too many tasks for one grid: ", T);
  const MlpDims d = mlp_dims(layer_sizes);
  const int64_t P = d.P;
  TORCH_CHECK_VALUE(theta.dim() == 1 && theta.size(0) == P, "theta must be [", P, "] for layers ", layer_sizes);
  TORCH_CHECK_VALUE(support_x.size(2) == layer_sizes[0] && query_x.size(2) == layer_sizes[0],
              "support_x and query_x must have ", layer_sizes[0], " features");
  if (loss == LossKind::Mse) {
    TORCH_CHECK_TYPE(support_y.scalar_type() == at::kFloat && query_y.scalar_type() == at::kFloat,
                     "MSE targets must be float32, got ", support_y.scalar_type(), " and ", query_y.scalar_type());
    TORCH_CHECK_VALUE(support_y.dim() == 3 && support_y.size(0) == T && support_y.size(1) == K && support_y.size(2) == O,
                "support_y must be [T, K, O]");
    TORCH_CHECK_VALUE(query_y.dim() == 3 && query_y.size(0) == T && query_y.size(1) == Q && query_y.size(2) == O,
                "query_y must be [T, Q, O]");
  } else {
    // Labels are not range-checked here (a device sync); the kernel turns a bad one into
    // a NaN loss, never an out-of-bounds read.
    TORCH_CHECK_TYPE(support_y.scalar_type() == at::kLong && query_y.scalar_type() == at::kLong,
                     "labels must be int64, got ", support_y.scalar_type(), " and ", query_y.scalar_type());
    TORCH_CHECK_VALUE(support_y.dim() == 2 && support_y.size(0) == T && support_y.size(1) == K, "support_y must be [T, K]");
    TORCH_CHECK_VALUE(query_y.dim() == 2 && query_y.size(0) == T && query_y.size(1) == Q, "query_y must be [T, Q]");
  }
  int rate_kind;
  if (lr.dim() == 1) rate_kind = kRateStep;
  else if (lr.dim() == 2 && lr.size(1) == 2 * L) rate_kind = kRateTensor;
  else if (lr.dim() == 2 && lr.size(1) == P) rate_kind = kRatePerParam;
  else TORCH_CHECK_VALUE(false, "lr must be [steps], [steps, ", 2 * L, "] or [steps, ", P, "], got ", lr.sizes());
  TORCH_CHECK_VALUE(lr.size(0) == steps, "lr must have one row per step");
  c10::cuda::CUDAGuard guard(theta.device());
  const int64_t bytes = mlp_smem_floats(d, steps, K, Q) * static_cast<int64_t>(sizeof(float));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, theta.get_device()));
  TORCH_CHECK_NOT_IMPLEMENTED(bytes <= limit, "mlp_meta_step: this MLP needs ", bytes, " bytes of shared memory per task; the GPU "
              "gives a block ", limit, " (the launcher should have sent it to the general path)");
  if (grads == 1) {
    TORCH_CHECK_VALUE(loss_weights.has_value(), "grads == 1 needs loss_weights");
    TORCH_CHECK_TYPE(loss_weights->scalar_type() == at::kFloat, "loss_weights must be float32, got ",
                     loss_weights->scalar_type());
    TORCH_CHECK_VALUE(loss_weights->device() == theta.device() && loss_weights->is_contiguous() &&
                          loss_weights->dim() == 1 && loss_weights->size(0) == T,
                      "grads == 1 needs contiguous loss_weights [T] = [", T, "] on ", theta.device(), ", got shape ",
                      loss_weights->sizes(), " on ", loss_weights->device());
  }
  at::Tensor losses = at::empty({T}, theta.options());
  at::Tensor preds = at::empty({T, Q, O}, theta.options());
  std::vector<int64_t> lr_task_shape{T};
  for (auto s : lr.sizes()) lr_task_shape.push_back(s);
  at::Tensor gtheta = grads ? at::empty({T, P}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor glr = grads ? at::empty(lr_task_shape, theta.options()) : at::empty({0}, theta.options());
  MlpArgs a{};
  a.d = d;
  a.theta = theta.data_ptr<float>();
  a.sx = support_x.data_ptr<float>();
  a.sy = support_y.data_ptr();
  a.qx = query_x.data_ptr<float>();
  a.qy = query_y.data_ptr();
  a.lr = lr.data_ptr<float>();
  a.rate_kind = rate_kind;
  a.steps = static_cast<int>(steps);
  a.K = static_cast<int>(K);
  a.Q = static_cast<int>(Q);
  a.act = static_cast<int>(act);
  a.loss = static_cast<int>(loss);
  a.slope = static_cast<float>(negative_slope);
  a.first_order = first_order;
  a.grads = grads != 0;
  a.losses = losses.data_ptr<float>();
  a.preds = preds.data_ptr<float>();
  a.gtheta = grads ? gtheta.data_ptr<float>() : nullptr;
  a.glr = grads ? glr.data_ptr<float>() : nullptr;
  a.lr_per_task = static_cast<int>(lr.numel());
  C10_CUDA_CHECK(launch_mlp_meta_step(a, T, bytes, stream()));
  if (grads != 1) return {losses, preds, gtheta, glr};
  // Σ_t w_t · (per-task gradient): two GEMVs in a fixed order (deterministic).
  at::Tensor g_theta = at::mv(gtheta.t(), *loss_weights);
  at::Tensor g_lr = steps == 0 ? at::zeros(lr.sizes(), lr.options())
                               : at::mv(glr.reshape({T, -1}).t(), *loss_weights).reshape(lr.sizes());
  return {losses, preds, g_theta, g_lr};
}

}  // namespace



// The shared-memory formula's answer for Python (fastmeta/backends/cuda_limits.py decides
// with it whether the fused kernel takes a shape), so that the formula is written once.
int64_t mlp_meta_step_workspace_floats(at::IntArrayRef layer_sizes, int64_t K, int64_t Q, int64_t steps) {
  return mlp_smem_floats(mlp_dims(layer_sizes), steps, K, Q);
}

// The depth cap of the kernel-parameter struct (kMaxLayers, mlp_meta_step.cuh), for Python:
// the constant lives here and fastmeta/backends/cuda_limits.py asks for it.
int64_t mlp_meta_step_max_layers() { return kMaxLayers; }

}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("mlp_meta_step_workspace_floats(int[] layer_sizes, int K, int Q, int steps) -> int",
        &fastmeta::cuda::mlp_meta_step_workspace_floats);
  m.def("mlp_meta_step_max_layers() -> int", &fastmeta::cuda::mlp_meta_step_max_layers);
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("mlp_meta_step_with_task_gradients", &fastmeta::mlp_meta_step_with_task_gradients<&fastmeta::cuda::mlp_meta_step>);
  m.impl("mlp_meta_step_backward", &fastmeta::mlp_meta_step_backward<&fastmeta::cuda::mlp_meta_step>);
  m.impl("mlp_meta_step_weigh_task_gradients", &fastmeta::mlp_meta_step_weigh_task_gradients);
}

// The fused MLP meta-step on CUDA: the interface between mlp_meta_step.cu and
// mlp_meta_step_host.cpp, and the shared-memory formula, written once: the host checks it
// against the device's limit, and Python asks it through
// torch.ops.fastmeta_ext.mlp_meta_step_workspace_floats.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

// The one copy of the depth cap: Python asks for it (mlp_meta_step_max_layers).
constexpr int kMaxLayers = 32;
enum RateKind : int { kRateStep = 0, kRateTensor = 1, kRatePerParam = 2 };

struct MlpDims {
  int L, P, Hs, Es, nmax;
  int n[kMaxLayers + 1];
  int offW[kMaxLayers], offB[kMaxLayers];
  int cum[kMaxLayers + 2];  // cum[l] = n1 + … + n_{l−1}: h_l sits at rows·cum[l] in a pass
};

struct MlpArgs {
  MlpDims d;
  const float* theta;
  const float* sx;
  const void* sy;
  const float* qx;
  const void* qy;
  const float* lr;
  int rate_kind, steps, K, Q, act, loss;
  float slope;
  bool first_order, grads;
  float* losses;
  float* preds;
  float* gtheta;  // [T, P] per task
  float* glr;     // [T, lr numel] per task
  int lr_per_task;
};

// Shared-memory floats one CTA needs (the formula in mlp_meta_step.cu's header).
inline int64_t mlp_smem_floats(const MlpDims& d, int64_t S, int64_t K, int64_t Q) {
  return 2 * S * d.P + S * K * (2 * d.Hs + d.Es) + Q * (2 * d.Hs + d.Es) + 2 * d.P + 2 * K * d.Hs +
         3 * K * d.nmax + 33;
}

// Returns the CUDA error of the launch (cudaSuccess when it started).
cudaError_t launch_mlp_meta_step(const MlpArgs& a, int64_t tasks, int64_t smem_bytes, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta

// The CUDA side's interface between the host wrappers (register_cuda.cpp: tensor checks,
// allocation, the dispatcher registration) and the kernels (*.cu). The .cu files include
// no torch headers: ATen's headers cost ~40 s of nvcc time per file on 2 cores, the
// kernels alone ~5 s, and CI compiles these files on every fresh cache.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

// ---- inner_step
struct StepCoef {
  const float* lr;
  const int64_t* seg;
  const float* mask;
  const float* precond;
  bool scalar;
#ifdef __CUDACC__
  __device__ __forceinline__ float rate(int64_t p) const { return scalar ? lr[0] : (seg ? lr[seg[p]] : lr[p]); }
  __device__ __forceinline__ float coef(int64_t p) const {
    float r = rate(p);
    if (mask) r *= mask[p];
    if (precond) r *= precond[p];
    return r;
  }
#endif
};

void launch_inner_step(const float* theta, bool theta_shared, const float* g, StepCoef c, int64_t T, int64_t P,
                       float* out, cudaStream_t stream);
// S: the number of rates summed in shared memory (1 for a scalar lr, S for segments).
void launch_inner_step_backward(const float* go, const float* g, StepCoef c, int64_t T, int64_t P, int64_t S,
                                bool theta_shared, float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                float* d_precond, bool reduce_lr, cudaStream_t stream);

// ---- batched GEMM (task_linear family): C[b] = act(A[b]·B[b] + bias[b])
struct Strided {
  const float* p;
  int64_t b, r, c;  // batch, row, column strides
};

void launch_batched_gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C,
                         const float* bias, int64_t bias_b, int act, float slope, cudaStream_t stream);

// ---- task_loss (kind: fastmeta::LossKind as int)
void launch_task_loss(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C, int64_t M,
                      float* out, cudaStream_t stream);
void launch_task_loss_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                           int64_t M, float* out, cudaStream_t stream);

// ---- the fused MLP meta-step (mlp_meta_step.cu)
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

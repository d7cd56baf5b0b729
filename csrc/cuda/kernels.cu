// CUDA kernels of the element-wise and linear families: inner_step (+ backward),
// task_linear (+ input and weight gradients), task_loss (+ grad). float32 only (the
// launcher in extension.py sends float64 to the reference). The host wrappers in
// register_cuda.cpp check and allocate, and pass the current stream.
#include <cmath>
#include <cstdint>

#include "common_cuda.cuh"
#include "launchers.h"

namespace fastmeta {
namespace cuda {
namespace {

constexpr int kCrossEntropy = 0;  // fastmeta::LossKind::CrossEntropy

int blocks_for(int64_t n, int threads) {
  // Grid-stride loops below: a few waves of blocks are enough (132 SMs × 8 on an H100).
  int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b < 132 * 8 ? (b > 0 ? b : 1) : 132 * 8);
}

// ---------------------------------------------------------------------------------------
// inner_step: one launch over the whole [T, P] buffer (every layer's segment at once).
// The coefficient lr·mask·precond is formed per element from the [P]/[S] vectors (L2-
// resident); memory-bound at ~3 reads + 1 write per element.
// ---------------------------------------------------------------------------------------

__global__ void inner_step_kernel(const float* __restrict theta, bool theta_shared, const float* __restrict g,
                                  StepCoef c, int64_t T, int64_t P, float* __restrict out) {
  const int64_t n = T * P;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = i % P;
    out[i] = (theta_shared ? theta[p] : theta[i]) - c.coef(p) * g[i];
  }
}

// One thread per parameter column p, looping over tasks (coalesced across threads):
// d_grad, d_theta, and −Σ_t grad_out·g for the rate, mask and preconditioner. Per-segment
// (or scalar) rate gradients are summed in shared memory per block, then one atomicAdd
// per segment per block.
__global__ void inner_step_backward_kernel(const float* __restrict go, const float* __restrict g, StepCoef c,
                                           int64_t T, int64_t P, int64_t S, bool theta_shared,
                                           float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                           float* d_precond, bool reduce_lr) {
  extern __shared__ float seg_sum[];
  if (reduce_lr)
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) seg_sum[s] = 0.f;
  __syncthreads();
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
    const float coef = c.coef(p);
    float sum_go = 0.f, outer = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float o = go[t * P + p];
      sum_go += o;
      outer -= o * g[t * P + p];
      if (d_grad) d_grad[t * P + p] = -coef * o;
      if (d_theta && !theta_shared) d_theta[t * P + p] = o;
    }
    if (d_theta && theta_shared) d_theta[p] = sum_go;
    const float m = c.mask ? c.mask[p] : 1.f, pc = c.precond ? c.precond[p] : 1.f;
    if (d_lr) {
      const float d = outer * m * pc;
      if (reduce_lr) atomicAdd(&seg_sum[c.scalar ? 0 : c.seg[p]], d);
      else d_lr[p] = d;
    }
    if (d_mask) d_mask[p] = outer * c.rate(p) * pc;
    if (d_precond) d_precond[p] = outer * c.rate(p) * m;
  }
  __syncthreads();
  if (reduce_lr)
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) atomicAdd(&d_lr[s], seg_sum[s]);
}

// ---------------------------------------------------------------------------------------
// Batched GEMM for the task_linear family: C[b] = A[b]·B[b] (+ bias, activation), with A
// and B read through strides, so that x·wᵀ, grad·w and gradᵀ·x need no transposed copies
// and a shared weight is a batch stride of 0. 32×32 output tiles, 8 K-slices staged in
// shared memory, 256 threads × 4 outputs each. fp32 FMA throughout (no TF32).
// ---------------------------------------------------------------------------------------

constexpr int kTile = 32, kSlice = 8;

__global__ void batched_gemm_kernel(int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* __restrict C,
                                    const float* __restrict bias, int64_t bias_b, int act, float slope) {
  __shared__ float As[kSlice][kTile + 1];
  __shared__ float Bs[kSlice][kTile + 1];
  const int64_t batch = blockIdx.z;
  const int64_t m0 = blockIdx.y * (int64_t)kTile, n0 = blockIdx.x * (int64_t)kTile;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // ty in [0, 8)
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const float* a = A.p + batch * A.b;
  const float* b = B.p + batch * B.b;
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    // Stage A[m0:m0+32, k0:k0+8] and B[k0:k0+8, n0:n0+32]: 256 values each, one per thread.
    {
      const int kk = threadIdx.x % kSlice, mm = threadIdx.x / kSlice;  // mm in [0, 32)
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? a[m * A.r + k * A.c] : 0.f;
      const int64_t n = n0 + tx, kb = k0 + ty;
      Bs[ty][tx] = (n < N && kb < K) ? b[kb * B.r + n * B.c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSlice; ++kk) {
      const float bv = Bs[kk][tx];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = fmaf(As[kk][ty + 8 * i], bv, acc[i]);
    }
    __syncthreads();
  }
  const int64_t n = n0 + tx;
  if (n >= N) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 8 * i;
    if (m >= M) continue;
    float v = acc[i];
    if (bias) v += bias[batch * bias_b + n];
    C[(batch * M + m) * N + n] = act_fwd(v, act, slope);
  }
}

// ---------------------------------------------------------------------------------------
// task_loss: one block per task, a deterministic block sum over its N rows (or N·D
// values). task_loss_grad: one thread per row (cross-entropy) or per value (MSE).
// A label outside [0, C) gives NaN for its task instead of an out-of-bounds read: checking
// labels on the host would cost a device sync.
// ---------------------------------------------------------------------------------------

__global__ void task_loss_kernel(const float* __restrict pred, const void* target, int kind, int64_t N, int64_t C,
                                 int64_t M, float* __restrict out) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x;
  float acc = 0.f;
  if (kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(target) + t * N;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const float* z = pred + (t * N + n) * C;
      float mx = z[0];
      for (int64_t c = 1; c < C; ++c) mx = fmaxf(mx, z[c]);
      float s = 0.f;
      for (int64_t c = 0; c < C; ++c) s += expf(z[c] - mx);
      const int64_t label = y[n];
      acc += (label >= 0 && label < C) ? mx + logf(s) - z[label] : NAN;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[t] = acc / static_cast<float>(N);
  } else {
    const float* yv = static_cast<const float*>(target) + t * M;
    const float* z = pred + t * M;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) acc += (z[i] - yv[i]) * (z[i] - yv[i]);
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[t] = acc / static_cast<float>(M);
  }
}

__global__ void task_loss_grad_kernel(const float* __restrict pred, const void* target, int kind, int64_t T,
                                      int64_t N, int64_t C, int64_t M, float* __restrict out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(target);
    const float inv = 1.f / static_cast<float>(N);
    for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < T * N; row += stride) {
      const float* z = pred + row * C;
      float* o = out + row * C;
      float mx = z[0];
      for (int64_t c = 1; c < C; ++c) mx = fmaxf(mx, z[c]);
      float s = 0.f;
      for (int64_t c = 0; c < C; ++c) s += expf(z[c] - mx);
      const float lse = mx + logf(s);
      const int64_t label = y[row];
      for (int64_t c = 0; c < C; ++c) o[c] = (expf(z[c] - lse) - (c == label ? 1.f : 0.f)) * inv;
      if (label < 0 || label >= C)
        for (int64_t c = 0; c < C; ++c) o[c] = NAN;
    }
  } else {
    const float* yv = static_cast<const float*>(target);
    const float scale = 2.f / static_cast<float>(M);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T * M; i += stride)
      out[i] = (pred[i] - yv[i]) * scale;
  }
}

}  // namespace

void launch_inner_step(const float* theta, bool theta_shared, const float* g, StepCoef c, int64_t T, int64_t P,
                       float* out, cudaStream_t stream) {
  inner_step_kernel<<<blocks_for(T * P, 256), 256, 0, stream>>>(theta, theta_shared, g, c, T, P, out);
}

void launch_inner_step_backward(const float* go, const float* g, StepCoef c, int64_t T, int64_t P, int64_t S,
                                bool theta_shared, float* d_theta, float* d_grad, float* d_lr, float* d_mask,
                                float* d_precond, bool reduce_lr, cudaStream_t stream) {
  const size_t smem = reduce_lr ? S * sizeof(float) : 0;
  inner_step_backward_kernel<<<blocks_for(P, 256), 256, smem, stream>>>(go, g, c, T, P, S, theta_shared, d_theta,
                                                                        d_grad, d_lr, d_mask, d_precond, reduce_lr);
}

void launch_batched_gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C,
                         const float* bias, int64_t bias_b, int act, float slope, cudaStream_t stream) {
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile, batches);
  batched_gemm_kernel<<<grid, 256, 0, stream>>>(M, N, K, A, B, C, bias, bias_b, act, slope);
}

void launch_task_loss(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C, int64_t M,
                      float* out, cudaStream_t stream) {
  task_loss_kernel<<<T, 256, 0, stream>>>(pred, target, kind, N, C, M, out);
}

void launch_task_loss_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                           int64_t M, float* out, cudaStream_t stream) {
  const int64_t work = kind == kCrossEntropy ? T * N : T * M;
  task_loss_grad_kernel<<<blocks_for(work, 256), 256, 0, stream>>>(pred, target, kind, T, N, C, M, out);
}

}  // namespace cuda
}  // namespace fastmeta

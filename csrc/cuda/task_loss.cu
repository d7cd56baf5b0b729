// CUDA kernels of task_loss, task_loss_grad and task_loss_grad_backward (float32).
#include <cmath>
#include <cstdint>

#include "../log_sum_exp.h"
#include "common_cuda.cuh"
#include "task_loss.cuh"

namespace fastmeta {
namespace cuda {

namespace {

constexpr int kCrossEntropy = 0;  // fastmeta::LossKind::CrossEntropy

// ---------------------------------------------------------------------------------------
// task_loss: one block per task, a deterministic block sum over its N rows (or N·D
// values). task_loss_grad: one thread per row (cross-entropy) or per value (MSE).
// A label outside [0, C) gives NaN for its task instead of an out-of-bounds read: checking
// labels on the host would cost a device sync.
// ---------------------------------------------------------------------------------------

// accuracy (cross-entropy, nullable): task_accuracy's [T] from the same rows
// (task_loss_and_accuracy): each row's first largest logit beside its log-sum-exp, the hits
// summed as task_accuracy_kernel sums them.
__global__ void task_loss_kernel(const float* __restrict pred, const void* target, int kind, int64_t N, int64_t C,
                                 int64_t M, float* __restrict out, float* __restrict accuracy) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x;
  float acc = 0.f;
  if (kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(target) + t * N;
    float hits = 0.f;
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const float* z = pred + (t * N + n) * C;
      const int64_t label = y[n];
      acc += (label >= 0 && label < C) ? log_sum_exp(z, C) - z[label] : NAN;
      if (accuracy) {
        int64_t best = 0;
        for (int64_t c = 1; c < C && z[best] == z[best]; ++c)  // x != x: x is NaN (no fast-math here)
          if (z[c] != z[c] || z[c] > z[best]) best = c;
        hits += best == label ? 1.f : 0.f;
      }
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[t] = acc / static_cast<float>(N);
    if (accuracy) {
      hits = block_sum(hits, scratch);
      if (threadIdx.x == 0) accuracy[t] = hits / static_cast<float>(N);
    }
  } else {
    const float* yv = static_cast<const float*>(target) + t * M;
    const float* z = pred + t * M;
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) acc += (z[i] - yv[i]) * (z[i] - yv[i]);
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) out[t] = acc / static_cast<float>(M);
  }
}

// scale (nullable): task t's gradient times scale[t * scale_stride] (the upstream gradient
// of task_loss, handed over by its backward), after the unscaled value is rounded.
__global__ void task_loss_grad_kernel(const float* __restrict pred, const void* target, int kind, int64_t T,
                                      int64_t N, int64_t C, int64_t M, const float* __restrict scale,
                                      int64_t scale_stride, float* __restrict out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(target);
    const float inv = 1.f / static_cast<float>(N);
    for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < T * N; row += stride) {
      const float* z = pred + row * C;
      float* o = out + row * C;
      const float lse = log_sum_exp(z, C);
      const int64_t label = y[row];
      const float s = scale ? scale[(row / N) * scale_stride] : 1.f;
      if (scale) {
        for (int64_t c = 0; c < C; ++c) o[c] = ((expf(z[c] - lse) - (c == label ? 1.f : 0.f)) * inv) * s;
      } else {
        for (int64_t c = 0; c < C; ++c) o[c] = (expf(z[c] - lse) - (c == label ? 1.f : 0.f)) * inv;
      }
      if (label < 0 || label >= C)
        for (int64_t c = 0; c < C; ++c) o[c] = NAN;
    }
  } else {
    const float* yv = static_cast<const float*>(target);
    const float two_over_m = 2.f / static_cast<float>(M);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T * M; i += stride) {
      const float g = (pred[i] - yv[i]) * two_over_m;
      out[i] = scale ? g * scale[(i / M) * scale_stride] : g;
    }
  }
}

// task_loss_and_grad: task_loss_kernel's block per task, each thread writing the gradient
// of the rows (or values) it reads for the loss: the loss as task_loss_kernel sums it, the
// gradient as task_loss_grad_kernel writes it (unscaled), one launch where they were two.
__global__ void task_loss_and_grad_kernel(const float* __restrict pred, const void* target, int kind, int64_t N,
                                          int64_t C, int64_t M, float* __restrict loss, float* __restrict grad) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x;
  float acc = 0.f;
  if (kind == kCrossEntropy) {
    const int64_t* y = static_cast<const int64_t*>(target) + t * N;
    const float inv = 1.f / static_cast<float>(N);
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      const float* z = pred + (t * N + n) * C;
      float* o = grad + (t * N + n) * C;
      const int64_t label = y[n];
      const bool valid = label >= 0 && label < C;
      const float lse = log_sum_exp(z, C);
      acc += valid ? lse - z[label] : NAN;
      for (int64_t c = 0; c < C; ++c) o[c] = valid ? (expf(z[c] - lse) - (c == label ? 1.f : 0.f)) * inv : NAN;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[t] = acc / static_cast<float>(N);
  } else {
    const float* yv = static_cast<const float*>(target) + t * M;
    const float* z = pred + t * M;
    float* o = grad + t * M;
    const float two_over_m = 2.f / static_cast<float>(M);
    for (int64_t i = threadIdx.x; i < M; i += blockDim.x) {
      acc += (z[i] - yv[i]) * (z[i] - yv[i]);
      o[i] = (z[i] - yv[i]) * two_over_m;
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) loss[t] = acc / static_cast<float>(M);
  }
}

// task_loss_grad_backward: the VJP of task_loss_grad w.r.t. pred. One thread per row for
// cross-entropy (p ⊙ (u − Σ_k p_k u_k) / N, two passes over the row's C values), one per
// value for MSE (u · 2 / M). The target is not read.
__global__ void task_loss_grad_backward_kernel(const float* __restrict upstream, const float* __restrict pred,
                                               int kind, int64_t T, int64_t N, int64_t C, int64_t M,
                                               float* __restrict out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  if (kind == kCrossEntropy) {
    const float inv = 1.f / static_cast<float>(N);
    for (int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; row < T * N; row += stride) {
      const float* z = pred + row * C;
      const float* u = upstream + row * C;
      float* o = out + row * C;
      const float lse = log_sum_exp(z, C);
      float pu = 0.f;
      for (int64_t c = 0; c < C; ++c) pu += expf(z[c] - lse) * u[c];
      for (int64_t c = 0; c < C; ++c) o[c] = expf(z[c] - lse) * (u[c] - pu) * inv;
    }
  } else {
    const float scale = 2.f / static_cast<float>(M);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < T * M; i += stride)
      out[i] = upstream[i] * scale;
  }
}

// task_accuracy: one block per task, each thread a row at a time: the first largest logit
// (a NaN the largest, as torch.argmax), a hit where it is the label; a deterministic block
// sum of the hits (exact in float up to 2^24 rows).
__global__ void task_accuracy_kernel(const float* __restrict pred, const int64_t* __restrict target, int64_t N,
                                     int64_t C, float* __restrict out) {
  __shared__ float scratch[33];
  const int64_t t = blockIdx.x;
  float hits = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const float* z = pred + (t * N + n) * C;
    int64_t best = 0;
    for (int64_t c = 1; c < C && z[best] == z[best]; ++c)  // x != x: x is NaN (no fast-math here)
      if (z[c] != z[c] || z[c] > z[best]) best = c;
    hits += best == target[t * N + n] ? 1.f : 0.f;
  }
  hits = block_sum(hits, scratch);
  if (threadIdx.x == 0) out[t] = hits / static_cast<float>(N);
}

}  // namespace

void launch_task_loss(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C, int64_t M,
                      float* out, float* accuracy, cudaStream_t stream) {
  task_loss_kernel<<<T, 256, 0, stream>>>(pred, target, kind, N, C, M, out, accuracy);
}

void launch_task_loss_and_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                               int64_t M, float* loss, float* grad, cudaStream_t stream) {
  task_loss_and_grad_kernel<<<T, 256, 0, stream>>>(pred, target, kind, N, C, M, loss, grad);
}

void launch_task_accuracy(const float* pred, const int64_t* target, int64_t T, int64_t N, int64_t C, float* out,
                          cudaStream_t stream) {
  task_accuracy_kernel<<<T, 256, 0, stream>>>(pred, target, N, C, out);
}

void launch_task_loss_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                           int64_t M, const float* scale, int64_t scale_stride, float* out, cudaStream_t stream) {
  const int64_t work = kind == kCrossEntropy ? T * N : T * M;
  task_loss_grad_kernel<<<blocks_for(work, 256), 256, 0, stream>>>(pred, target, kind, T, N, C, M, scale,
                                                                    scale_stride, out);
}

void launch_task_loss_grad_backward(const float* upstream, const float* pred, int kind, int64_t T, int64_t N,
                                    int64_t C, int64_t M, float* out, cudaStream_t stream) {
  const int64_t work = kind == kCrossEntropy ? T * N : T * M;
  task_loss_grad_backward_kernel<<<blocks_for(work, 256), 256, 0, stream>>>(upstream, pred, kind, T, N, C, M, out);
}

}  // namespace cuda
}  // namespace fastmeta

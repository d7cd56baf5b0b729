// task_loss on CUDA: the interface between its kernels (task_loss.cu) and their host
// wrappers (task_loss_host.cpp). kind: fastmeta::LossKind as int.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

// accuracy: null, or (cross-entropy) task_accuracy's [T] from the same pass.
void launch_task_loss(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C, int64_t M,
                      float* out, float* accuracy, cudaStream_t stream);
// scale: null, or [T] read at scale[t * scale_stride], multiplying task t's gradient.
void launch_task_loss_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                           int64_t M, const float* scale, int64_t scale_stride, float* out, cudaStream_t stream);
// task_loss and task_loss_grad (unscaled) in one launch: loss [T], grad like pred.
void launch_task_loss_and_grad(const float* pred, const void* target, int kind, int64_t T, int64_t N, int64_t C,
                               int64_t M, float* loss, float* grad, cudaStream_t stream);
// task_accuracy: pred [T, N, C], target int64 [T, N] → out [T].
void launch_task_accuracy(const float* pred, const int64_t* target, int64_t T, int64_t N, int64_t C, float* out,
                          cudaStream_t stream);
void launch_task_loss_grad_backward(const float* upstream, const float* pred, int kind, int64_t T, int64_t N,
                                    int64_t C, int64_t M, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta

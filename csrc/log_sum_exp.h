// log Σ_j exp(z[j]) over one row of logits: the one softmax normaliser of every C++ and CUDA
// loss (task_loss on both devices, the fused MLP meta-step's cross-entropy on both). The max
// is subtracted first so that exp never overflows; a NaN logit makes the result NaN. Plain
// C++ with no torch headers, so that the CUDA kernels (which include none: ATen's headers
// cost ~40 s of nvcc time per file) can use it too.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define FM_HOST_DEVICE __host__ __device__
#else
#define FM_HOST_DEVICE
#endif

namespace fastmeta {

FM_HOST_DEVICE inline float fm_exp(float x) { return expf(x); }
FM_HOST_DEVICE inline double fm_exp(double x) { return ::exp(x); }
FM_HOST_DEVICE inline float fm_log(float x) { return logf(x); }
FM_HOST_DEVICE inline double fm_log(double x) { return ::log(x); }

template <typename T>
FM_HOST_DEVICE inline T log_sum_exp(const T* z, int64_t n) {
  T mx = z[0];
  for (int64_t j = 1; j < n; ++j) mx = z[j] > mx ? z[j] : mx;
  T sum = T(0);
  for (int64_t j = 0; j < n; ++j) sum += fm_exp(z[j] - mx);
  return mx + fm_log(sum);
}

}  // namespace fastmeta

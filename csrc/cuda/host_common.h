// What the CUDA host wrappers (csrc/cuda/*_host.cpp) share: the checks, the stream.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include "../common.h"

namespace fastmeta {
namespace cuda {

constexpr auto kCUDA = c10::DeviceType::CUDA;

#define FM_CHECK_CUDA_F32(x)   \
  FM_CHECK_INPUT(x, kCUDA);    \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat, #x " must be float32 on CUDA, got ", (x).scalar_type())

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace cuda
}  // namespace fastmeta

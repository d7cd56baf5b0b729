// What the CPU kernels share beyond csrc/common.h.
#pragma once

#include <c10/core/DeviceType.h>

#include <cstdint>

namespace fastmeta {
namespace cpu {

constexpr auto kCPU = c10::DeviceType::CPU;
// Elements per parallel chunk: below ~32k floats the OpenMP fork/join (a few µs) costs
// more than the pass itself on this class of machine.
constexpr int64_t kGrain = 32768;

}  // namespace cpu
}  // namespace fastmeta

// activation_grad through its autograd node in C++ (csrc/cpu/activation.cpp), for the nodes
// of the ops that fuse an activation (task_linear.cpp): grad_y · f'(y).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fastmeta {
namespace cpu {

// grad_y · f'(y) on the CPU kernel. Where autograd records (grad mode on, and grad_y or y
// needs a gradient), through activation_grad's C++ node (ActivationGradNode), so the graph
// is the one the public op's Python node builds; otherwise the kernel alone. Either way one
// profiler range named as the public op (fastmeta::activation_grad) around the kernel's.
at::Tensor activation_grad_on_node(const at::Tensor& grad_y, const at::Tensor& y, const std::string& act,
                                   double negative_slope);

}  // namespace cpu
}  // namespace fastmeta

// Helpers of the eager path's autograd nodes in C++ (task_conv2d.cpp, task_batch_norm.cpp):
// an op's node calls its CPU kernels itself, with no Python between autograd's engine and
// the kernels. See "The eager path's autograd nodes in C++" in task_conv2d.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <utility>
#include <vector>

namespace fastmeta {
namespace cpu {
namespace eager_nodes {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline c10::List<bool> bool_list(std::initializer_list<bool> values) {
  c10::List<bool> out;
  for (bool v : values) out.push_back(v);
  return out;
}

inline c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// A tensor argument as the kernels take it: contiguous.
inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

inline c10::optional<at::Tensor> contiguous(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t.contiguous()) : c10::nullopt;
}

// An upstream gradient that carries something: defined, of an output that was computed
// (an empty output's gradient is empty too).
inline at::Tensor upstream(const at::Tensor& g, bool computed) {
  return computed && g.defined() && g.numel() > 0 ? g : at::Tensor();
}

// The edge index of each tensor argument of a node (-1 for an absent optional one), in the
// order the arguments come: autograd's needs_input_grad counts only the tensors given.
inline std::vector<int64_t> edge_indices(std::initializer_list<bool> present) {
  std::vector<int64_t> out;
  int64_t next = 0;
  for (bool p : present) out.push_back(p ? next++ : -1);
  return out;
}

inline bool needs_grad(AutogradContext* ctx, int64_t edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

// A layer node's outputs: y, then an alias (a view) of each of the two inputs its backward
// reads, where asked. The backward reads them through the aliases (saved in their place),
// so a gradient a backward op sends them arrives at this node as an alias output's and is
// added in the kernel (the addends), not by autograd's engine with an aten add (see
// register_autograd's aliased_inputs, fastmeta/ops/registration.py). Saves what the
// backward reads, then `also`.
inline variable_list outputs_with_aliases(AutogradContext* ctx, at::Tensor y, const at::Tensor& first,
                                          const at::Tensor& second, bool alias_first, bool alias_second,
                                          const at::Tensor& also = at::Tensor()) {
  variable_list outputs{std::move(y)};
  at::Tensor first_read = first, second_read = second;
  if (alias_first) outputs.push_back(first_read = first.view_as(first));
  if (alias_second) outputs.push_back(second_read = second.view_as(second));
  ctx->save_for_backward({first_read, second_read, also});
  ctx->saved_data["alias_first"] = alias_first;
  ctx->saved_data["alias_second"] = alias_second;
  return outputs;
}

// The gradients the two aliases of outputs_with_aliases received (undefined where an input
// was not aliased, or nothing reached its alias).
inline std::pair<at::Tensor, at::Tensor> alias_grads(AutogradContext* ctx, const variable_list& grads) {
  const bool first = ctx->saved_data["alias_first"].toBool(), second = ctx->saved_data["alias_second"].toBool();
  return {first ? grads[1] : at::Tensor(), second ? grads[first ? 2 : 1] : at::Tensor()};
}

// f() recorded for the profiler as a public op's call would be: a range named as the public
// op (fastmeta::<name>) around one named as its kernel (fastmeta_ext::<name>). The
// dispatch counter (fastmeta/tools/dispatches.py) then counts a node's kernel call as the
// Python node's op call, and a reader of a trace finds the kernel by the same name. (No
// cost while no profiler listens.) public_name null: the kernel's range only (a forward
// node, inside the range the public op's Python call opened).
template <typename F>
auto recorded(const char* public_name, const char* kernel_name, F&& f) {
  at::RecordFunction op_range(at::RecordScope::FUNCTION);
  if (public_name != nullptr && op_range.isActive()) op_range.before(public_name);
  at::RecordFunction kernel_range(at::RecordScope::FUNCTION);
  if (kernel_range.isActive()) kernel_range.before(kernel_name);
  return f();
}

// A public op fastmeta::<name> called through the dispatcher (its autograd is the one
// torch.library registered): where a node's backward itself records a graph for an order
// the C++ nodes do not build. `stack` holds the arguments; returns the outputs.
inline torch::jit::Stack call_public_op(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(stack);
  return stack;
}

// The one output of the public op `name` ("fastmeta::<op>", looked up by name: for the
// third-order paths, not the hot one) called through the dispatcher on `stack`.
inline at::Tensor public_op_output(const char* name, torch::jit::Stack stack) {
  const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  return call_public_op(op, std::move(stack))[0].toTensor();
}

}  // namespace eager_nodes
}  // namespace cpu
}  // namespace fastmeta

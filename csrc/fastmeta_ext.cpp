// The schema of every private kernel op of the fastmeta_ext library. The implementations
// are registered per device by TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp (CPU) and
// csrc/cuda/*.cu (CUDA); the dispatcher routes on the tensors' device, so no source here
// branches on is_cuda. An op without an implementation for a device raises
// NotImplementedError there, and the launcher never calls it (see extension.py).
//
// These ops are the *kernels* behind the public torch.ops.fastmeta.* ops: they carry no
// autograd. The public ops (fastmeta/ops/*.py) hold the autograd and call these through
// the backend registry.
#include <torch/library.h>

TORCH_LIBRARY(fastmeta_ext, m) {
  m.def("inner_step(Tensor theta, Tensor grad, Tensor lr, Tensor? mask, Tensor? precond, "
        "Tensor? segments) -> Tensor");
  m.def("inner_step_backward(Tensor grad_out, Tensor grad, Tensor lr, Tensor? mask, "
        "Tensor? precond, Tensor? segments, bool theta_shared, bool[] needs) -> Tensor[]");
  m.def("task_linear(Tensor x, Tensor w, Tensor? b, str act, float negative_slope) -> Tensor");
  m.def("task_linear_input_grad(Tensor grad_out, Tensor w) -> Tensor");
  m.def("task_linear_weight_grad(Tensor grad_out, Tensor x, bool shared) -> Tensor");
  m.def("task_batch_norm(Tensor x, Tensor? gamma, Tensor? beta, float eps, str act, "
        "float negative_slope) -> Tensor");
  m.def("task_batch_norm_backward(Tensor grad_z, Tensor x, Tensor? gamma, float eps, "
        "bool[] needs) -> Tensor[]");
  m.def("task_loss(Tensor pred, Tensor target, str kind) -> Tensor");
  m.def("task_loss_grad(Tensor pred, Tensor target, str kind) -> Tensor");
  m.def("activation_grad(Tensor grad_y, Tensor y, str act, float negative_slope) -> Tensor");
  // The fused small-MLP meta-step (csrc/cpu/mlp_meta_step.cpp, csrc/cuda/mlp_meta_step.cu).
  // Returns (losses [T], preds [T,Q,O], grad_theta, grad_lr):
  //   grads == 0: no gradients (both empty);
  //   grads == 1: Σ_t task_weights[t] · d loss_t / d(theta, lr): [P] and lr's shape;
  //   grads == 2: per task, unweighted: [T, P] and [T, *lr.shape].
  m.def("mlp_meta_step(Tensor theta, int[] layer_sizes, str act, float negative_slope, "
        "Tensor support_x, Tensor support_y, Tensor query_x, Tensor query_y, str loss_kind, "
        "Tensor lr, int steps, bool first_order, int grads, Tensor? task_weights) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

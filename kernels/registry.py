"""The triton backend's kernel table: kernel name → launcher.

Each launcher takes exactly the reference function's arguments (fastmeta/ops/*.py) and
returns fresh tensors, or ``NotImplemented`` to decline; the op layer then runs the
reference. Loaded lazily by fastmeta.backends.optional_backends, never at fastmeta import.
"""

from fastmeta.kernels import activation, inner_step, task_batch_norm, task_conv2d, task_linear, task_loss

KERNELS = {
    "inner_step": inner_step.inner_step,
    "inner_step_backward": inner_step.inner_step_backward,
    "task_linear": task_linear.task_linear,
    "task_linear_input_grad": task_linear.task_linear_input_grad,
    "task_linear_weight_grad": task_linear.task_linear_weight_grad,
    "task_conv2d": task_conv2d.task_conv2d,
    "task_conv2d_input_grad": task_conv2d.task_conv2d_input_grad,
    "task_conv2d_weight_grad": task_conv2d.task_conv2d_weight_grad,
    "task_batch_norm": task_batch_norm.task_batch_norm,
    "task_batch_norm_backward": task_batch_norm.task_batch_norm_backward,
    "task_loss": task_loss.task_loss,
    "task_loss_grad": task_loss.task_loss_grad,
    "activation_grad": activation.activation_grad,
}

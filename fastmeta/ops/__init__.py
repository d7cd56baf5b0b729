"""fastmeta's public ops, registered as ``torch.ops.fastmeta.*``.

One module per op family: the docstring gives the shapes, then the reference, the
registration (``register_fake``, ``register_autograd``) and the dispatch to a backend.
Every backward is built from registered ops, so second-order MAML differentiates through
the inner loop on whichever backend runs them.
"""

from fastmeta.ops.activation import ACTIVATIONS, activation_grad
from fastmeta.ops.inner_step import inner_step, inner_step_backward
from fastmeta.ops.max_pool2d import max_pool2d, max_pool2d_backward, max_pool2d_double_backward
from fastmeta.ops.mlp_meta_step import mlp_meta_step, mlp_meta_step_backward
from fastmeta.ops.mlp_meta_step_update import mlp_meta_step_update
from fastmeta.ops.task_batch_norm import task_batch_norm, task_batch_norm_backward
from fastmeta.ops.task_batch_norm_max_pool2d import (
    task_batch_norm_max_pool2d,
    task_batch_norm_max_pool2d_backward,
    task_batch_norm_max_pool2d_double_backward,
)
from fastmeta.ops.task_conv2d import (
    task_conv2d,
    task_conv2d_backward,
    task_conv2d_double_backward,
    task_conv2d_input_grad,
    task_conv2d_weight_grad,
)
from fastmeta.ops.task_layer_norm import task_layer_norm, task_layer_norm_backward
from fastmeta.ops.task_linear import (
    task_linear,
    task_linear_backward,
    task_linear_double_backward,
    task_linear_input_grad,
    task_linear_weight_grad,
)
from fastmeta.ops.task_loss import (LOSS_KINDS, task_accuracy, task_loss, task_loss_and_accuracy, task_loss_and_grad,
                                    task_loss_grad, task_loss_grad_backward)

__all__ = [
    "ACTIVATIONS",
    "LOSS_KINDS",
    "activation_grad",
    "inner_step",
    "inner_step_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "max_pool2d_double_backward",
    "mlp_meta_step",
    "mlp_meta_step_backward",
    "mlp_meta_step_update",
    "task_batch_norm",
    "task_batch_norm_backward",
    "task_batch_norm_max_pool2d",
    "task_batch_norm_max_pool2d_backward",
    "task_batch_norm_max_pool2d_double_backward",
    "task_conv2d",
    "task_conv2d_backward",
    "task_conv2d_double_backward",
    "task_conv2d_input_grad",
    "task_conv2d_weight_grad",
    "task_layer_norm",
    "task_layer_norm_backward",
    "task_linear",
    "task_linear_backward",
    "task_linear_double_backward",
    "task_linear_input_grad",
    "task_linear_weight_grad",
    "task_loss",
    "task_loss_grad",
    "task_loss_grad_backward",
    "task_accuracy",
    "task_loss_and_accuracy",
    "task_loss_and_grad",
]

"""Task samplers: sinusoid regression, Omniglot, image folders; all drawn on the data's device.

Every sampler's ``sample(iteration, task_indices)`` returns a ``TaskBatch`` whose tasks are
a pure function of (seed, iteration, global task index), so a meta-batch split over
processes is the same meta-batch (see ``fastmeta.data.random``).
"""

from .errors import DatasetError
from .few_shot import FewShotTasks, TaskPlan
from .image_folder import ImageFolderTasks
from .omniglot import Omniglot, maml_split_sizes
from .sinusoid import SinusoidTasks
from .task_batch import TaskBatch

__all__ = [
    "TaskBatch",
    "TaskPlan",
    "FewShotTasks",
    "SinusoidTasks",
    "Omniglot",
    "maml_split_sizes",
    "ImageFolderTasks",
    "DatasetError",
]

"""N-way K-shot classification tasks drawn on the dataset's device.

The dataset sits on the device as one uint8 tensor of images, classes laid out as
contiguous runs (``class_start``, ``class_count``). A meta-batch is drawn with a fixed
number of tensor ops, whatever T, N or K:

1. one ``random_words`` call gives every random word the T tasks need;
2. ``topk`` over per-class keys picks N distinct classes per task, in a random order;
3. ``topk`` over per-example keys picks K + Q distinct examples of each chosen class;
4. one gather reads the images (and applies the k·90° rotations, through a precomputed
   pixel permutation, when rotations are on).

Ties are impossible: each key is ``word * count + position``, so ``topk`` has one
answer and CPU and CUDA agree. The classes come out in a random order, and label n is
given to the n-th of them, so the labels are a fresh random permutation for every task.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .random import as_task_indices, below, random_words, random_words_block
from .task_batch import TaskBatch

__all__ = ["FewShotTasks", "TaskPlan"]


class TaskPlan(NamedTuple):
    """Which images make up each task, before they are gathered.

    classes:   int64 [T, N], indices into the sampler's classes; label n is classes[:, n].
    examples:  int64 [T, N, K+Q], positions within each class; the first K are the support.
    rotations: int64 [T, N], the number of 90° counter-clockwise turns of each class
               (as ``torch.rot90(image, k, dims=(-2, -1))``), or None without rotations.
    """

    classes: torch.Tensor
    examples: torch.Tensor
    rotations: torch.Tensor | None


class FewShotTasks:
    """Samples N-way K-shot tasks with Q queries per class from images already in memory.

    Args:
        images: uint8 ``[num_images, C, H, W]``, on the device the tasks should be drawn on.
            Pixel values map to floats in [0, 1] as ``value / 255``.
        class_start, class_count: int64 ``[num_classes]``: class c is
            ``images[class_start[c] : class_start[c] + class_count[c]]``.
        ways, shots, queries: N, K and Q. Every class needs at least K + Q images.
        rotate: rotate each class of a task by a random multiple of 90° (Omniglot's
            augmentation, which needs square images).
        seed: the run seed; tasks are a pure function of (seed, stream, iteration, task index).
        stream: a name that keeps this sampler's draws apart from other samplers'
            ("omniglot/train" and "omniglot/val" never share random words).
        class_names: optional names, for error messages.

    Use ``sample(iteration, task_indices)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        class_start: torch.Tensor,
        class_count: torch.Tensor,
        *,
        ways: int,
        shots: int,
        queries: int,
        rotate: bool = False,
        seed: int = 0,
        stream: str = "tasks",
        class_names: list[str] | None = None,
    ):
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images: expected uint8 [num_images, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        num_classes = class_start.numel()
        if class_count.shape != class_start.shape or class_start.dim() != 1:
            raise ValueError(
                f"class_start and class_count must be 1-D and the same shape, got "
                f"{tuple(class_start.shape)} and {tuple(class_count.shape)}"
            )
        if ways > num_classes:
            raise ValueError(
                f"ways={ways} needs at least {ways} classes, but {stream!r} has only {num_classes}"
            )
        counts = class_count.cpu()
        fewest = int(counts.min())
        if fewest < shots + queries:
            smallest = int(counts.argmin())
            which = class_names[smallest] if class_names else f"class {smallest}"
            raise ValueError(
                f"shots={shots} + queries={queries} needs {shots + queries} examples per class, "
                f"but {which} in {stream!r} has only {fewest}"
            )
        if rotate and images.shape[-1] != images.shape[-2]:
            raise ValueError(f"rotate=True needs square images, got {tuple(images.shape[-2:])}")

        self.images = images
        self.device = images.device
        self.class_start = class_start.to(self.device, torch.int64)
        self.class_count = class_count.to(self.device, torch.int64)
        self.num_classes = num_classes
        self.max_count = int(counts.max())
        # Classes with fewer images than the largest get their missing positions masked out.
        self._uneven_classes = fewest != self.max_count
        self.ways, self.shots, self.queries = ways, shots, queries
        self.rotate = rotate
        self.seed = seed
        self.stream = stream
        self.class_names = class_names
        self._image_shape = tuple(images.shape[1:])
        if rotate:
            channels, side = images.shape[1], images.shape[-1]
            grid = torch.arange(side * side, dtype=torch.int64).view(side, side)
            rotated = torch.stack([torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)])
            # _rotated_offsets[k, c, p]: where output pixel p of channel c comes from within
            # an image after k turns, so all tasks' rotations are one gather together.
            self._rotated_offsets = (
                rotated.view(4, 1, -1) + (torch.arange(channels) * side * side).view(1, -1, 1)
            ).to(self.device)
        # Labels do not depend on the draw: class order is random, so label n = n-th class.
        self._support_labels = torch.arange(ways, device=self.device).repeat_interleave(shots)
        self._query_labels = torch.arange(ways, device=self.device).repeat_interleave(queries)

    def __repr__(self) -> str:
        return (
            f"FewShotTasks({self.stream!r}, classes={self.num_classes}, ways={self.ways}, "
            f"shots={self.shots}, queries={self.queries}, rotate={self.rotate}, device={self.device})"
        )

    def plan(self, iteration: int, task_indices) -> TaskPlan:
        """The classes, examples and rotations of each task (see TaskPlan), without images."""
        tasks = as_task_indices(task_indices, self.device)
        return self._plan(random_words(self.seed, iteration, self.stream, tasks, self._slots_per_task))

    def plan_block(self, iterations, task_indices) -> TaskPlan:
        """``plan`` for several iterations: leading dimension I * T, iteration-major."""
        tasks = as_task_indices(task_indices, self.device)
        return self._plan(random_words_block(self.seed, iterations, self.stream, tasks, self._slots_per_task))

    @property
    def _slots_per_task(self) -> int:
        # Slot layout of one task's words: [class keys | rotations | example keys].
        return self.num_classes + self.ways + self.ways * self.max_count

    def _plan(self, words: torch.Tensor) -> TaskPlan:
        num_tasks = words.shape[0]
        ways, per_class, classes_total, count = self.ways, self.shots + self.queries, self.num_classes, self.max_count
        class_words, rotation_words, example_words = words.split((classes_total, ways, ways * count), dim=1)

        class_keys = class_words * classes_total + torch.arange(classes_total, device=self.device)
        classes = class_keys.topk(ways, dim=1).indices  # [T, N], in random order

        example_keys = example_words.view(num_tasks, ways, count) * count + torch.arange(count, device=self.device)
        if self._uneven_classes:
            present = torch.arange(count, device=self.device) < self.class_count[classes].unsqueeze(-1)
            example_keys = example_keys.masked_fill(~present, -1)  # valid keys are >= 0
        examples = example_keys.topk(per_class, dim=2).indices  # [T, N, K+Q]

        rotations = below(rotation_words, 4) if self.rotate else None
        return TaskPlan(classes, examples, rotations)

    def _read(self, image_index: torch.Tensor, turns: torch.Tensor | None) -> torch.Tensor:
        """float32 [n, C, H, W] in [0, 1]: images ``image_index`` [n], each rotated ``turns`` [n] times."""
        channels, height, width = self._image_shape
        # index_select and gather, not advanced indexing: on the CPU they measured 7x (W4's
        # whole images) and 30x (W2's rotated pixels) faster than images[index].
        if turns is None:
            pixels = self.images.index_select(0, image_index)
        else:
            # One flat gather: where each image starts + each pixel's rotated offset within it.
            pixels_per_image = channels * height * width
            source = (image_index * pixels_per_image).unsqueeze(1) + self._rotated_offsets.view(4, -1)[turns]
            pixels = torch.gather(self.images.view(-1), 0, source.view(-1))
        # Convert, then divide in place: `uint8 / 255.0` converts into a temporary first and
        # measured 1.5x slower on the CPU. A true division (not a multiplication by 1/255) so
        # that 255 maps to exactly 1.0.
        return pixels.to(torch.float32).div_(255.0).view(-1, channels, height, width)

    def gather(self, plan: TaskPlan) -> TaskBatch:
        """The images and labels of planned tasks, as a TaskBatch of float32 images in [0, 1]."""
        num_tasks, ways, per_class = plan.examples.shape
        shots, queries = self.shots, self.queries
        image_index = self.class_start[plan.classes].unsqueeze(-1) + plan.examples  # [T, N, K+Q]
        # Every task's support images, then every task's query images: one read fills both,
        # and each is a contiguous slice of it, so neither is copied again.
        in_order = torch.cat([image_index[:, :, :shots].reshape(-1), image_index[:, :, shots:].reshape(-1)])
        turns = None
        if plan.rotations is not None:
            per_image = plan.rotations.unsqueeze(-1).expand(num_tasks, ways, per_class)
            turns = torch.cat([per_image[:, :, :shots].reshape(-1), per_image[:, :, shots:].reshape(-1)])
        images = self._read(in_order, turns)
        support_count = num_tasks * ways * shots
        image_shape = images.shape[1:]
        return TaskBatch(
            images[:support_count].view(num_tasks, ways * shots, *image_shape),
            self._support_labels.expand(num_tasks, -1).contiguous(),
            images[support_count:].view(num_tasks, ways * queries, *image_shape),
            self._query_labels.expand(num_tasks, -1).contiguous(),
        )

    def sample_block(self, iterations, task_indices) -> list[TaskBatch]:
        """``[sample(i, task_indices) for i in iterations]``, drawn together (one RNG call,
        one gather): what a training loop on a GPU wants, where a draw is launch-bound."""
        tasks = as_task_indices(task_indices, self.device)
        return self.gather(self.plan_block(iterations, tasks)).split_tasks(tasks.numel())

    def sample(self, iteration: int, task_indices) -> TaskBatch:
        """The tasks ``task_indices`` (global indices) of meta-iteration ``iteration``.

        ``task_indices``: an int n (tasks 0..n-1), a range, a sequence or an int64 tensor.
        A task depends only on (seed, stream, iteration, its index), so rank r of W can
        draw ``range(r * T // W, (r + 1) * T // W)`` and get exactly its share of one
        process's meta-batch.
        """
        return self.gather(self.plan(iteration, task_indices))

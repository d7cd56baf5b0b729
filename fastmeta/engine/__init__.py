"""The engine: the flat task buffer and model capture."""

from fastmeta.engine.capture import CapturedProgram, PerTaskLoopProgram, capture
from fastmeta.engine.task_weights import Layout, Segment, TaskWeights

__all__ = ["CapturedProgram", "Layout", "PerTaskLoopProgram", "Segment", "TaskWeights", "capture"]

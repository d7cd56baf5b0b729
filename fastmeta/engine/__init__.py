"""The engine: the meta-iteration over all tasks at once.

- :mod:`fastmeta.engine.plan`: the plan a learner hands the engine for each call;
- :mod:`fastmeta.engine.task_weights`: the flat ``[T, P]`` buffer and its layout;
- :mod:`fastmeta.engine.program`: the model program (``trace``: torch.fx → ops);
- :mod:`fastmeta.engine.meta_iteration`: inner loop, losses, chunking, the fused path;
- :mod:`fastmeta.engine.whole_step`: a whole meta-iteration in one CUDA graph, and the
  rule for captured state (``WatchedState``);
- :mod:`fastmeta.engine.eager_graphs`: ``meta_batch`` on a GPU replayed from CUDA graphs
  cached per input shape, behind one autograd node;
- :mod:`fastmeta.engine.whole_step_policy`: which training iterations run as whole steps,
  and the optimizer settings a captured step needs.

The oracle the engine is tested and benchmarked against, the reference loop, is not part
of it: :mod:`fastmeta.testing.reference_loop`.

The learners call the engine with a plan; the engine never calls back into a learner.
Only the engine calls the ops.
"""

from fastmeta.engine.meta_iteration import LossSpec, MetaBatchOutput, MetaIteration
from fastmeta.engine.plan import AdaptationPlan, StepRule
from fastmeta.engine.program import PerTaskLoopProgram, TracedProgram, trace
from fastmeta.engine.task_weights import Layout, Segment, TaskWeights
from fastmeta.engine.whole_step import CapturedMetaStep, FusedMLPStep

__all__ = [
    "AdaptationPlan", "CapturedMetaStep", "FusedMLPStep", "Layout", "LossSpec", "MetaBatchOutput", "MetaIteration",
    "PerTaskLoopProgram", "Segment", "StepRule", "TaskWeights", "TracedProgram", "trace",
]

"""The peers of the end-to-end benchmark: loop, vmap, compile, graph, jax.

Defined in ``fastmeta.tools.bench_peers`` (see its docstring for what each one runs and why);
this module is the checkout's name for them.
"""

from fastmeta.tools.bench_peers import (
    PEERS,
    CompilePeer,
    Contender,
    ContenderSkipped,
    FastmetaContender,
    FastmetaGraphContender,
    GraphPeer,
    JaxPeer,
    LoopPeer,
    Problem,
    TaskBatch,
    VmapPeer,
    reference_meta_gradient,
)

__all__ = [
    "PEERS", "CompilePeer", "Contender", "ContenderSkipped", "FastmetaContender", "FastmetaGraphContender",
    "GraphPeer", "JaxPeer", "LoopPeer", "Problem", "TaskBatch", "VmapPeer", "reference_meta_gradient",
]

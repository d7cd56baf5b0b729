"""W1–W4 of ../shared/BENCHMARKS.md: model builder, tasks, shots, queries, inner steps, lr, loss.

The definitions live in ``fastmeta.benchmarks.WORKLOADS`` (one source of truth, inside the
package so that the installed ``fastmeta bench`` / ``fastmeta profile`` can read them);
this module is the checkout's name for them.

    from workloads import WORKLOADS           # from bench/
    w = WORKLOADS["W2"]; model = w.build_model(); batch = w.make_batch("cuda")
"""

from fastmeta.benchmarks import WORKLOADS, Workload, find_workload

__all__ = ["WORKLOADS", "Workload", "find_workload"]

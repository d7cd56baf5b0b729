"""Peak RSS of regression evaluation against its task count (issue 26, defect 4).

    python bench/eval_memory.py [--tasks 600 20000] [--steps 0 1 10]

Each task count runs in a fresh process (``fastmeta.tools.training.task_scores`` on the
sinusoid preset, the path of ``fastmeta eval --tasks``, ``train --test-tasks`` and
``--validation-tasks``) and reports its peak RSS (``ru_maxrss``). Target: the peak at
20 000 tasks is at most 1.1x that at 600 (before chunking: 2.36 GB against 0.88 GB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, torch
from fastmeta.tools import training
run = training.Run(training.PRESETS["sinusoid"], "cpu")
steps = tuple(int(s) for s in sys.argv[2].split(","))
scores = training.task_scores(run, "test", int(sys.argv[1]), steps)
assert all(v.shape[0] == int(sys.argv[1]) for v in scores.values())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mib(tasks: int, steps: tuple[int, ...]) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tasks), ",".join(map(str, steps))],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[600, 20000])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 1, 10])
    args = parser.parse_args()
    peaks = {n: peak_rss_mib(n, tuple(args.steps)) for n in args.tasks}
    base = peaks[args.tasks[0]]
    for n, peak in peaks.items():
        print(f"{n:>9} tasks: peak RSS {peak:8.1f} MiB  ({peak / base:.2f}x that at {args.tasks[0]})")


if __name__ == "__main__":
    main()

"""Paired comparisons of learners and options at equal budget (issue 17's tables).

    python bench/learner_comparison.py PRESET --rows maml model-aware [ROW ...] --seeds 0 1 2 \
        --out DIR [--data PATH] [--report FILE]

Every row trains for every seed with the preset's iterations and schedule, is scored on the
same fixed test tasks, and is compared task by task with the first row (or --baseline):
the mean over seeds and the paired difference with its 95% confidence interval. Runs are
resumable. The implementation is fastmeta.tools.comparison (the rows: its VARIANTS).
"""

import sys

from fastmeta.tools.comparison import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""End-to-end benchmark: fastmeta on every backend against its peers, W1–W4.

    python bench/e2e.py [--workloads W1,W2] [--first-order] [--json FILE] [--iterations N] ...

The same command as ``fastmeta bench``; the implementation is fastmeta.tools.bench (in the
package, so the installed command needs no checkout). bench/gpu_check.py runs it on a GPU
in its time-boxed plan.
"""

import sys

from fastmeta.tools.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The hops of one ``learner.meta_batch`` call: fastmeta's Python frames from the public call
down to the deepest point it reaches, and the checks it runs on the way.

    python bench/call_hops.py            # W1 and W2, second order, on the CPU
    python bench/call_hops.py --json     # the same as JSON

A hop is one fastmeta (or ``kernels/``) function frame on the deepest call chain of the
call; the chain is printed top to bottom. The checks counted are the validation sites that
a call can pass through (the engine's boundary checks, the op's argument check, the
launcher's dtype and ``takes`` checks, the op's kernel rule). The counts are deterministic;
they are not timings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import fastmeta as fm
from fastmeta.tools.workloads import WORKLOADS

ROOT = str(Path(fm.__file__).resolve().parent.parent)

# Validation sites a meta_batch call can run through: (module, qualified name).
CHECK_SITES = [
    ("fastmeta.engine.meta_iteration", "MetaIteration.check_tasks"),
    ("fastmeta.engine.meta_iteration", "check_labels"),
    ("fastmeta.engine.meta_iteration", "check_step_weights"),
    ("fastmeta.engine.meta_iteration", "MetaIteration.fused_mlp_applies"),
    ("fastmeta.ops.mlp_meta_step", "check_arguments"),
    ("fastmeta.ops.mlp_meta_step", "_kernel_shape_ok"),
    ("fastmeta.ops.mlp_meta_step", "_native_takes"),
    ("fastmeta.backends.extension", "_devices_and_dtypes_ok"),
]


def _ours(frame) -> bool:
    filename = frame.f_code.co_filename
    return filename.startswith(ROOT) and "/.venv/" not in filename and "/bench/" not in filename


def deepest_chain(call) -> list[str]:
    """The fastmeta frames of the deepest chain that ``call()`` reaches."""
    best: list[str] = []

    def profile(frame, event, arg):
        nonlocal best
        if event != "call" or not _ours(frame):
            return
        chain, f = [], frame
        while f is not None:
            if _ours(f):
                chain.append(f"{Path(f.f_code.co_filename).relative_to(ROOT)}:{f.f_code.co_qualname}")
            f = f.f_back
        if len(chain) > len(best):
            best = chain

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return list(reversed(best))


def check_counts(call) -> dict[str, int]:
    """How many times each validation site ran during ``call()``."""
    counts = {f"{m}.{q}": 0 for m, q in CHECK_SITES}
    wanted = {(sys.modules[m].__file__ if m in sys.modules else None, q.rpartition(".")[2]): f"{m}.{q}"
              for m, q in CHECK_SITES}

    def profile(frame, event, arg):
        if event == "call":
            key = wanted.get((frame.f_code.co_filename, frame.f_code.co_name))
            if key is not None:
                counts[key] += 1

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return {k: v for k, v in counts.items() if not k.endswith(("fused_mlp_applies",)) or v}


def measure(name: str) -> dict:
    workload = WORKLOADS[name]
    torch.manual_seed(0)
    model = workload.build_model()
    learner = fm.MAML(model, workload.inner_lr, first_order=False, steps=workload.steps)
    batch = workload.make_batch("cpu")
    inputs = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    learner.meta_batch(*inputs)  # warm: the extension loaded, first-shape checks done
    chain = deepest_chain(lambda: learner.meta_batch(*inputs))
    import fastmeta.backends.extension  # noqa: F401  (for the check sites' module files)
    import fastmeta.ops.mlp_meta_step  # noqa: F401

    counts = check_counts(lambda: learner.meta_batch(*inputs))
    return {"workload": name, "hops": len(chain), "chain": chain, "checks": counts,
            "check_calls": sum(counts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("workloads", nargs="*", default=["W1", "W2"])
    args = parser.parse_args()
    results = [measure(name) for name in args.workloads]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"{r['workload']}: {r['hops']} hops, {r['check_calls']} validation calls")
        for frame in r["chain"]:
            print(f"  {frame}")
        for site, n in r["checks"].items():
            print(f"  check {site}: {n}")


if __name__ == "__main__":
    main()

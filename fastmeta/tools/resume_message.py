"""The line a resumed run prints (issue 26: "resuming from iteration 3000 of 1000")."""

from __future__ import annotations


def resume_message(preset: str, start: int, iterations: int) -> str:
    if start >= iterations:
        return (f"fastmeta: resuming {preset} at iteration {start}, already past --iterations {iterations}: "
                "no iterations left to train")
    return f"fastmeta: resuming {preset} from iteration {start} of {iterations}"

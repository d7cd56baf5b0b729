"""Task sampling throughput: meta-batches per second at the standard workloads' shapes.

    pytest bench/bench_sampling.py --benchmark-columns=median,ops --benchmark-sort=name

One benchmark call draws one meta-batch with ``sampler.sample(iteration, range(T))``,
the way ``fastmeta train`` does: the counter-RNG words, the class and example choices,
the rotations and the image gather, on the device the dataset lives on. The figure to
compare is ``ops`` (meta-batches/s) against the meta-iteration time of the same
workload: sampling should be a small fraction of it (W2's target step on an H200 is
about 0.5 ms, so sampling wants well above 2000 meta-batches/s there).

Datasets are random uint8 tensors of the real datasets' sizes, so no files are needed:
Omniglot's 1100 training characters x 20 drawings at 28x28 (W2, W3), miniImageNet's 64
training classes x 600 images at 3x84x84 (W4). CUDA cases skip cleanly without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastmeta.data import FewShotTasks, SinusoidTasks

# BENCHMARKS.md, "Standard workloads": tasks per meta-batch and the per-task sets.
SAMPLING_WORKLOADS = {
    "W1": dict(kind="sinusoid", meta_batch=25, shots=10, queries=10),
    "W2": dict(kind="omniglot", meta_batch=32, ways=5, shots=1, queries=1),
    "W3": dict(kind="omniglot", meta_batch=16, ways=20, shots=1, queries=1),
    "W4": dict(kind="miniimagenet", meta_batch=4, ways=5, shots=1, queries=15),
}
DATASET_SHAPES = {
    # classes, images per class, channels, side; rotations as in the protocol
    "omniglot": (1100, 20, 1, 28, True),
    "miniimagenet": (64, 600, 3, 84, False),
}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def make_sampler(workload: dict, device: str):
    if workload["kind"] == "sinusoid":
        return SinusoidTasks(workload["shots"], workload["queries"], device=device)
    classes, per_class, channels, side, rotate = DATASET_SHAPES[workload["kind"]]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, channels, side, side), dtype=torch.uint8, generator=generator)
    return FewShotTasks(
        images.to(device),
        class_start=torch.arange(classes) * per_class,
        class_count=torch.full((classes,), per_class),
        ways=workload["ways"],
        shots=workload["shots"],
        queries=workload["queries"],
        rotate=rotate,
        stream=f"bench/{workload['kind']}",
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload_name", sorted(SAMPLING_WORKLOADS))
def test_sampling(benchmark, workload_name, device):
    workload = SAMPLING_WORKLOADS[workload_name]
    sampler = make_sampler(workload, device)
    tasks = range(workload["meta_batch"])
    iteration = iter(range(10**9))  # a new meta-batch every call, as in training

    def draw():
        batch = sampler.sample(next(iteration), tasks)
        if device == "cuda":
            torch.cuda.synchronize()
        return batch

    batch = draw()  # first-call costs (allocator, kernel loading) outside the timing
    benchmark.pedantic(draw, rounds=30, iterations=10, warmup_rounds=2)
    assert batch.support_x.shape[0] == workload["meta_batch"]
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    benchmark.extra_info["meta_batches_per_second"] = round(1.0 / benchmark.stats.stats.median, 1)

"""Task sampling throughput: meta-batches per second at the standard workloads' shapes.

    pytest bench/bench_sampling.py --benchmark-columns=median,ops --benchmark-sort=name

Each benchmark draws meta-batches the way ``fastmeta train`` does, one at a time
(``sample``) or 64 iterations' at a time (``sample_block``, which training uses on a GPU
and, for small tasks, on the CPU): the counter-RNG words, the class and example choices,
the rotations and the image gather, on the device the dataset lives on. The figure to
compare is ``extra_info["meta_batches_per_second"]`` against the meta-iteration time of
the same workload: sampling should be a small fraction of it (W2's target step on an H200
is about 0.5 ms, so sampling wants well above 2000 meta-batches/s there).

Datasets are random uint8 tensors of the real datasets' sizes, so no files are needed:
Omniglot's 1100 training characters x 20 drawings at 28x28 (W2, W3), miniImageNet's 64
training classes x 600 images at 3x84x84 (W4). CUDA cases skip cleanly without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastmeta.data import FewShotTasks, SinusoidTasks

# docs/benchmarks.md, "Standard workloads": tasks per meta-batch and the per-task sets.
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


@pytest.mark.parametrize("block", [1, 64], ids=["single", "block64"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workload_name", sorted(SAMPLING_WORKLOADS))
def test_sampling(benchmark, workload_name, device, block):
    """One call draws ``block`` meta-batches (``sample`` or ``sample_block``); the figure
    recorded is meta-batches per second."""
    workload = SAMPLING_WORKLOADS[workload_name]
    if workload["kind"] == "miniimagenet" and block > 1:
        pytest.skip("a block of 64 W4 meta-batches is 1.7 GiB of images; training draws W4 a few at a time")
    sampler = make_sampler(workload, device)
    tasks = range(workload["meta_batch"])
    iteration = iter(range(0, 10**9, block))  # new meta-batches every call, as in training

    def draw():
        start = next(iteration)
        batches = [sampler.sample(start, tasks)] if block == 1 else sampler.sample_block(range(start, start + block), tasks)
        if device == "cuda":
            torch.cuda.synchronize()
        return batches

    batches = draw()  # first-call costs (allocator, kernel loading) outside the timing
    benchmark.pedantic(draw, rounds=20 if block > 1 else 30, iterations=1 if block > 1 else 10, warmup_rounds=2)
    assert len(batches) == block and batches[0].support_x.shape[0] == workload["meta_batch"]
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    benchmark.extra_info["torch_threads"] = torch.get_num_threads()
    benchmark.extra_info["meta_batches_per_second"] = round(block / benchmark.stats.stats.median, 1)

import math

import pytest
import torch

from fastmeta.data import SinusoidTasks, TaskBatch


def test_shapes_and_ranges():
    tasks = SinusoidTasks(shots=10, queries=7)
    batch = tasks.sample(0, 25)
    assert isinstance(batch, TaskBatch)
    assert batch.support_x.shape == (25, 10, 1) and batch.support_y.shape == (25, 10, 1)
    assert batch.query_x.shape == (25, 7, 1) and batch.query_y.shape == (25, 7, 1)
    assert all(t.dtype == torch.float32 for t in batch)
    assert batch.support_x.min() >= -5 and batch.support_x.max() <= 5
    assert batch.support_y.abs().max() <= 5


def test_targets_are_one_sinusoid_per_task():
    tasks = SinusoidTasks(shots=5, queries=5)
    sampled = tasks.sample_with_parameters(3, range(40))
    amplitude, phase = sampled.amplitude, sampled.phase
    assert amplitude.min() >= 0.1 and amplitude.max() <= 5
    assert phase.min() >= 0 and phase.max() <= math.pi
    batch = sampled.batch
    expected = amplitude.view(-1, 1, 1) * torch.sin(batch.query_x - phase.view(-1, 1, 1))
    torch.testing.assert_close(batch.query_y, expected)
    # Support and query come from the same function.
    torch.testing.assert_close(
        batch.support_y, amplitude.view(-1, 1, 1) * torch.sin(batch.support_x - phase.view(-1, 1, 1))
    )
    assert torch.equal(tasks.sample(3, range(40)).query_y, batch.query_y)


def test_sharding_gives_the_same_tasks():
    tasks = SinusoidTasks()
    whole = tasks.sample(17, range(8))
    parts = [tasks.sample(17, range(0, 4)), tasks.sample(17, range(4, 8))]
    for field, a, b in zip(TaskBatch._fields, whole, zip(*parts)):
        assert torch.equal(a, torch.cat(b)), field


def test_iterations_and_seeds_differ():
    a = SinusoidTasks(seed=0).sample(0, 4).support_x
    assert not torch.equal(a, SinusoidTasks(seed=0).sample(1, 4).support_x)
    assert not torch.equal(a, SinusoidTasks(seed=1).sample(0, 4).support_x)


def test_evaluation_tasks_are_fixed_and_on_a_grid():
    tasks = SinusoidTasks(shots=10, seed=123)
    evaluation = tasks.evaluation_tasks(600, seed=0)
    assert evaluation.batch.support_x.shape == (600, 10, 1)
    assert evaluation.batch.query_x.shape == (600, 100, 1)
    torch.testing.assert_close(evaluation.batch.query_x[0, :, 0], torch.linspace(-5, 5, 100))
    # The same for any training seed, and different from the training stream.
    again = SinusoidTasks(shots=10, seed=999).evaluation_tasks(600, seed=0)
    assert torch.equal(evaluation.amplitude, again.amplitude)
    assert not torch.equal(evaluation.batch.support_x, tasks.sample(0, 600).support_x)
    assert not torch.equal(evaluation.amplitude, tasks.evaluation_tasks(600, seed=1).amplitude)
    # A shard of the set is the same slice of it.
    shard = tasks.evaluation_tasks(range(100, 250), seed=0)
    assert torch.equal(shard.batch.support_x, evaluation.batch.support_x[100:250])
    assert torch.equal(shard.amplitude, evaluation.amplitude[100:250])
    # The truth helper draws the curve the targets came from.
    torch.testing.assert_close(
        SinusoidTasks.curve(evaluation.amplitude, evaluation.phase, evaluation.batch.query_x), evaluation.batch.query_y
    )


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="shots"):
        SinusoidTasks(shots=0)
    with pytest.raises(ValueError, match="queries"):
        SinusoidTasks(queries=-1)
    with pytest.raises(ValueError, match="amplitude"):
        SinusoidTasks(amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="task_indices"):
        SinusoidTasks().evaluation_tasks(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_inputs_match_cpu():
    cpu = SinusoidTasks(device="cpu").sample_with_parameters(5, range(32))
    cuda = SinusoidTasks(device="cuda").sample_with_parameters(5, range(32))
    # The uniforms and everything affine in them are bit-identical; sin may differ by an ulp.
    assert torch.equal(cpu.batch.support_x, cuda.batch.support_x.cpu())
    assert torch.equal(cpu.amplitude, cuda.amplitude.cpu())
    torch.testing.assert_close(cpu.batch.support_y, cuda.batch.support_y.cpu())


def test_a_block_of_iterations_equals_one_sample_per_iteration():
    tasks = SinusoidTasks(shots=5, queries=3, seed=2)
    block = tasks.sample_block(range(40, 43), range(4, 10))
    assert len(block) == 3
    for iteration, batch in zip(range(40, 43), block):
        for field, a, b in zip(TaskBatch._fields, batch, tasks.sample(iteration, range(4, 10))):
            assert torch.equal(a, b), field

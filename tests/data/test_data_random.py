import math

import pytest
import torch

from fastmeta.data.random import (
    MASK32,
    as_task_indices,
    below,
    fold_words,
    mix32,
    random_words,
    random_words_block,
    uniform,
)

# Pinned outputs. Tasks, and so resumed runs and published results, depend on these bits:
# a change to the construction must be deliberate, and must update these numbers.
GOLDEN_WORDS = [
    [2715924382, 3274505199, 331670612, 4014399341],
    [1823250626, 2569763143, 401574885, 2823141115],
    [1233978685, 4105483063, 3374825522, 3293622868],
]


def test_words_are_pinned():
    assert random_words(7, 3, "golden", [0, 1, 5], 4).tolist() == GOLDEN_WORDS


def test_python_ints_and_tensors_hash_identically():
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    tensor = mix32(torch.tensor(values, dtype=torch.int64))
    assert tensor.tolist() == [mix32(v) for v in values]
    assert tensor.min() >= 0 and tensor.max() <= MASK32


def test_mix32_is_a_bijection_on_a_sample():
    # Invertible hash: distinct inputs give distinct outputs (no collision among 2**20 words).
    words = torch.arange(0, 2**32, 4096 + 1, dtype=torch.int64)
    assert mix32(words).unique().numel() == words.numel()


def test_fold_words_separates_word_boundaries():
    assert fold_words([1, 2]) != fold_words([1 + 2 * 2**32])
    assert fold_words([1, 2]) != fold_words([2, 1])
    with pytest.raises(ValueError, match="non-negative"):
        fold_words([-1])


def test_rows_depend_only_on_their_task_index():
    whole = random_words(3, 11, "s", range(8), 50)
    first = random_words(3, 11, "s", range(0, 4), 50)
    second = random_words(3, 11, "s", torch.tensor([4, 5, 6, 7]), 50)
    assert torch.equal(whole, torch.cat([first, second]))
    shuffled = random_words(3, 11, "s", [6, 1], 50)
    assert torch.equal(shuffled, whole[[6, 1]])


def test_prefix_of_slots_does_not_depend_on_slot_count():
    assert torch.equal(random_words(1, 2, "s", 4, 10), random_words(1, 2, "s", 4, 30)[:, :10])


@pytest.mark.parametrize(
    "change", [dict(seed=1), dict(iteration=1), dict(stream="other")], ids=["seed", "iteration", "stream"]
)
def test_each_coordinate_changes_the_words(change):
    reference = dict(seed=0, iteration=0, stream="s")
    a = random_words(reference["seed"], reference["iteration"], reference["stream"], 16, 64)
    changed = {**reference, **change}
    b = random_words(changed["seed"], changed["iteration"], changed["stream"], 16, 64)
    # Independent words agree by chance with probability 2**-32 each.
    assert (a == b).sum() == 0


def test_uniform_statistics():
    u = uniform(random_words(0, 0, "stats", 256, 1024))
    assert u.dtype == torch.float32
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.003  # std of the mean: 0.29 / 512 = 0.00056
    assert abs(u.var().item() - 1 / 12) < 0.002
    # Chi-square over 64 bins: 63 degrees of freedom, the 99.99% quantile is about 115.
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    assert ((counts - expected) ** 2 / expected).sum() < 115
    # Neighbouring tasks and neighbouring slots are uncorrelated.
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:])):
        correlation = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(correlation) < 0.01


def test_every_output_bit_is_balanced():
    words = random_words(5, 5, "bits", 64, 4096)
    for bit in range(32):
        share = ((words >> bit) & 1).float().mean().item()
        assert abs(share - 0.5) < 0.01, f"bit {bit} is set in {share:.3f} of words"


def test_below_is_in_range_and_uniform():
    words = random_words(0, 0, "below", 64, 1000)
    values = below(words, 7)
    assert values.min() == 0 and values.max() == 6
    counts = torch.bincount(values.flatten(), minlength=7).float()
    assert (counts / counts.sum() - 1 / 7).abs().max() < 0.01


def test_task_index_forms():
    assert as_task_indices(3).tolist() == [0, 1, 2]
    assert as_task_indices(range(4, 10, 2)).tolist() == [4, 6, 8]
    assert as_task_indices([5, 1]).tolist() == [5, 1]
    with pytest.raises(ValueError, match="task_indices"):
        as_task_indices(range(0))
    with pytest.raises(ValueError, match="task_indices"):
        as_task_indices([-1])
    with pytest.raises(ValueError, match="task_indices"):
        as_task_indices(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="seed"):
        random_words(-1, 0, "s", 1, 1)
    with pytest.raises(ValueError, match="num_slots"):
        random_words(0, 0, "s", 1, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_bit_for_bit():
    for seed, iteration in ((0, 0), (2**40 + 3, 59999)):
        cpu = random_words(seed, iteration, "device", range(100), 300)
        cuda = random_words(seed, iteration, "device", range(100), 300, device="cuda")
        assert torch.equal(cpu, cuda.cpu())
        assert torch.equal(uniform(cpu), uniform(cuda).cpu())
        assert torch.equal(below(cpu, 1623), below(cuda, 1623).cpu())
    assert math.isfinite(uniform(cuda).sum().item())


def test_block_of_iterations_equals_one_draw_per_iteration():
    block = random_words_block(3, range(10, 14), "s", [7, 2, 9], 20)
    assert block.shape == (12, 20)
    for i, iteration in enumerate(range(10, 14)):
        assert torch.equal(block[3 * i : 3 * i + 3], random_words(3, iteration, "s", [7, 2, 9], 20))
    with pytest.raises(ValueError, match="iterations"):
        random_words_block(3, [], "s", 3, 20)

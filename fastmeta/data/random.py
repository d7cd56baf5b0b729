"""Counter-based random numbers: a pure function of (seed, iteration, stream, task, slot).

Why counter-based. A task must be the same whichever process draws it, in whatever
shard, on whichever device, and after a resume. A stateful generator (``torch.Generator``,
numpy) gives that only if every process replays the same sequence of calls. Here each
random word is a hash of its coordinates instead, so a meta-batch of tasks
``[t0, t1, ...)`` at iteration ``i`` is the same whether one process draws all of it or W
processes draw a slice each, and resuming at iteration ``i`` needs no generator state.

Construction. Every value is a 32-bit word kept in an int64 tensor (or a Python int):

- ``mix32`` is an invertible 32-bit integer hash (the xorshift-multiply shape of
  MurmurHash3's finaliser; constants from Chris Wellons' hash-prospector search,
  "lowbias32" family). Both multipliers are below 2**31, so for a word below 2**32 the
  product is below 2**63: it never overflows int64 and needs no unsigned arithmetic.
  Every product is masked back to 32 bits. No step depends on signed-overflow
  behaviour, so CPU and CUDA (and plain Python ints) give bit-identical words.
- The scalar coordinates (seed, iteration, stream name) are folded on the host, in
  Python integers, into one 32-bit base word: ``h = mix32(h + mix32(word + φ))`` per
  word.
- Tensor coordinates follow the same chain: ``h_task = mix32(base + mix32(task + φ))``
  over ``[T]``, then ``word = mix32(mix32(h_task + mix32(slot + φ)))`` over ``[T, S]``.
  Each coordinate is hashed before it is added, so two tasks' slot sequences never line
  up as shifted copies of each other (which ``h_task + slot`` or ``h_task ^ slot`` would
  allow); the final double round gives full avalanche.

That is about two dozen elementwise integer ops on ``[T, S]``, whatever S is, which is
why callers draw all the words one task needs in a single call and slice them.

Converting words to numbers stays exact on every device:
- ``uniform``: the top 24 bits times 2**-24, so float32 values in [0, 1) with no rounding.
- ``below(n)``: ``(word * n) >> 32`` (Lemire's multiply-shift), an integer in [0, n).
  Exact for n < 2**31.

Floats derived from these by transcendental functions (``sin`` in the sinusoid tasks)
can differ in the last ulp between CPU and CUDA; the uniforms themselves cannot.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import torch

__all__ = [
    "MASK32",
    "mix32",
    "fold_words",
    "stream_word",
    "base_word",
    "as_task_indices",
    "random_words",
    "random_words_block",
    "uniform",
    "below",
]

MASK32 = 0xFFFFFFFF
# 2**32 / golden ratio: an odd constant that spreads small consecutive counters (task 0, 1,
# 2, ...) before they are hashed, so counter 0 does not hash the all-zero word.
_PHI = 0x9E3779B9
_MUL_A = 0x21F0AAAD  # < 2**31: see the module docstring
_MUL_B = 0x735A2D97  # < 2**31


def mix32(x):
    """Invertible 32-bit hash of a word in [0, 2**32), for Python ints or int64 tensors.

    The same operators act on both, so the host and every device compute the same bits.
    """
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & MASK32
    x = x ^ (x >> 15)
    return x


def _absorb(state, word):
    """One link of the chain: hash the word, add it to the state, hash the sum."""
    return mix32((state + mix32((word + _PHI) & MASK32)) & MASK32)


def fold_words(words: Sequence[int]) -> int:
    """Fold non-negative Python integers of any size into one 32-bit word.

    Each integer is absorbed 32 bits at a time, low word first, followed by its number of
    32-bit words, so (1, 2) and (1 + 2 * 2**32,) fold differently.
    """
    state = 0
    for word in words:
        word = int(word)
        if word < 0:
            raise ValueError(f"fold_words: words must be non-negative, got {word}")
        count = 0
        while True:
            state = _absorb(state, word & MASK32)
            count += 1
            word >>= 32
            if word == 0:
                break
        state = _absorb(state, count)
    return state


def stream_word(name: str) -> int:
    """A stable 32-bit word for a stream name ("omniglot/train", "sinusoid/inputs", ...).

    sha256, not ``hash()``: Python salts ``hash`` of strings per process.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "little")


def base_word(seed: int, iteration: int, stream: str) -> int:
    """The host-side 32-bit word that all of one (seed, iteration, stream)'s draws start from."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if iteration < 0:
        raise ValueError(f"iteration must be a non-negative integer, got {iteration}")
    return fold_words((seed, iteration, stream_word(stream)))


def as_task_indices(task_indices, device=None) -> torch.Tensor:
    """Global task indices as a 1-D int64 tensor on ``device``.

    Accepts an int n (tasks 0..n-1), a ``range``, a sequence of ints, or a tensor.
    Indices must lie in [0, 2**32); ranges and sequences are checked here, tensors are
    trusted (checking them would cost a device sync on every meta-batch).
    """
    if isinstance(task_indices, torch.Tensor):
        if task_indices.dim() != 1 or task_indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                "task_indices: expected a 1-D int64 tensor of global task indices, got "
                f"shape {tuple(task_indices.shape)} and dtype {task_indices.dtype}"
            )
        return task_indices.to(device=device, dtype=torch.int64)
    if isinstance(task_indices, int):
        task_indices = range(task_indices)
    if isinstance(task_indices, range):
        if len(task_indices) == 0:
            raise ValueError(f"task_indices: {task_indices} is empty")
        low, high = min(task_indices), max(task_indices)
        if low < 0 or high > MASK32:
            raise ValueError(f"task_indices: {task_indices} must lie in [0, 2**32)")
        return torch.arange(
            task_indices.start, task_indices.stop, task_indices.step, dtype=torch.int64, device=device
        )
    values = [int(v) for v in task_indices]
    if not values:
        raise ValueError("task_indices: got an empty sequence")
    if min(values) < 0 or max(values) > MASK32:
        raise ValueError(f"task_indices: values must lie in [0, 2**32), got {min(values)}..{max(values)}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def random_words(seed: int, iteration: int, stream: str, task_indices, num_slots: int, device=None) -> torch.Tensor:
    """Random 32-bit words, int64 ``[T, num_slots]``, values in [0, 2**32).

    Row t depends only on (seed, iteration, stream, task_indices[t]) and column s only adds
    the slot index s, so any subset of tasks, drawn anywhere, gets the same rows.
    """
    tasks = as_task_indices(task_indices, device)
    return _words(base_word(seed, iteration, stream), tasks, num_slots)


def random_words_block(seed: int, iterations, stream: str, task_indices, num_slots: int, device=None) -> torch.Tensor:
    """``random_words`` for several iterations at once: int64 ``[I * T, num_slots]``, the T
    rows of ``iterations[0]`` first. Row ``i * T + t`` equals row t of
    ``random_words(seed, iterations[i], ...)``.

    One call instead of I: on a GPU the two dozen launches of a draw are paid once per
    block of iterations, not once per meta-batch.
    """
    iterations = list(iterations)
    if not iterations:
        raise ValueError("iterations is empty")
    tasks = as_task_indices(task_indices, device)
    bases = torch.tensor([base_word(seed, i, stream) for i in iterations], dtype=torch.int64)
    if tasks.device.type == "cuda":  # pinned and asynchronous: no stall behind queued kernels
        bases = bases.pin_memory().to(tasks.device, non_blocking=True)
    else:
        bases = bases.to(tasks.device)
    return _words(bases[:, None], tasks[None, :], num_slots).view(len(iterations) * tasks.numel(), num_slots)


def _words(base, tasks: torch.Tensor, num_slots: int) -> torch.Tensor:
    """The chain of the module docstring: base word(s) (an int, or a tensor broadcasting
    against ``tasks``), then the task index, then the slot index (a new last dimension)."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be at least 1, got {num_slots}")
    task_state = _absorb(base, tasks)
    slot_words = _slot_words(num_slots, tasks.device)  # [S]
    return mix32(mix32((task_state.unsqueeze(-1) + slot_words) & MASK32))


@functools.lru_cache(maxsize=64)
def _slot_words(num_slots: int, device: torch.device) -> torch.Tensor:
    """The hashed slot indices: the same for every draw of a sampler, so computed once
    (on a GPU that saves a dozen kernel launches per meta-batch). Read-only."""
    slots = torch.arange(num_slots, dtype=torch.int64, device=device)
    return mix32((slots + _PHI) & MASK32)


def uniform(words: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) from 32-bit words: the top 24 bits, exactly."""
    return (words >> 8).to(torch.float32) * (1.0 / (1 << 24))


def below(words: torch.Tensor, n) -> torch.Tensor:
    """Integers in [0, n) from 32-bit words, int64; n an int or an int64 tensor broadcastable to words.

    Multiply-shift keeps this exact in int64 as long as n < 2**31.
    """
    return (words * n) >> 32

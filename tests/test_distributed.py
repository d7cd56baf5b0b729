"""Task-parallel meta-training (fastmeta.distributed) on the CPU: gloo on 127.0.0.1.

Each multi-rank test spawns real processes that join through the same environment torchrun
gives its workers: the test process hosts the rendezvous TCPStore on a free port (as
torchrun's agent does) and the ranks read RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
TORCHELASTIC_USE_AGENT_STORE. Hosting the store here also means no port is picked and then
released (no race for it), and the store outlives a rank that dies. Every job runs under a
deadline; a rank still alive at the deadline is killed and the test fails, naming it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import multiprocessing
import os
import queue as queue_module
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import fastmeta as fm
from fastmeta import distributed as fmd
from fastmeta.data import FewShotTasks, SinusoidTasks

WORLD = 2
JOB_DEADLINE_S = 45.0
# Short, so a hang fails fast; the failure tests below must finish well inside it, which
# shows the failure was detected, not merely timed out.
COLLECTIVE_TIMEOUT_S = 20.0


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    # The single-process references run beside the ranks on a 2-core machine: with the
    # default 2 OpenMP threads, contention made the small conv net 40x slower (9 s vs 0.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- running a function on several ranks ----------------------------------------------------------


def _rank_entry(target, rank, world, port, results, timeout_s, args):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    started = time.monotonic()
    try:
        with fmd.init_from_env(device="cpu", timeout=timeout_s) as context:
            value = target(context, *args)
        # Tensors go back as torch.save bytes: a Queue would pass them by file descriptor,
        # which dies with this process.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, "ok", buffer.getvalue(), time.monotonic() - started))
    except BaseException as error:  # report everything, including the traceback, to the test
        results.put((rank, type(error).__name__, f"{error}\n{traceback.format_exc()}", time.monotonic() - started))


def _start_context():
    # A forkserver that has already imported torch, torch._dynamo (which torch.library's
    # custom ops import on their first call) and fastmeta: started once per session, it
    # then forks each rank in milliseconds. Spawning paid about 7 s of imports per rank,
    # twice over on a 2-core machine, for every job. Not plain fork: this test process has
    # run OpenMP kernels, and forking after that can deadlock the child.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "fastmeta", "fastmeta.distributed", __name__])
    return context


def run_ranks(target, *args, world=WORLD, timeout_s=COLLECTIVE_TIMEOUT_S, deadline_s=JOB_DEADLINE_S):
    """Run ``target(context, *args)`` on ``world`` spawned ranks; {rank: (status, value, seconds)}.

    status is "ok" or the exception's type name (value is then its message and traceback).
    """
    store = dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True, wait_for_workers=False)
    spawn = _start_context()
    results = spawn.Queue()
    ranks = [
        spawn.Process(target=_rank_entry, args=(target, rank, world, store.port, results, timeout_s, args), daemon=True)
        for rank in range(world)
    ]
    for process in ranks:
        process.start()
    outcome, deadline = {}, time.monotonic() + deadline_s
    try:
        while len(outcome) < world and time.monotonic() < deadline:
            try:
                rank, status, value, seconds = results.get(timeout=0.2)
                if status == "ok":
                    value = torch.load(io.BytesIO(value), weights_only=False)
                outcome[rank] = (status, value, seconds)
            except queue_module.Empty:
                if all(not p.is_alive() for p in ranks) and results.empty():
                    break
    finally:
        for process in ranks:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    missing = [r for r in range(world) if r not in outcome]
    assert not missing, f"rank(s) {missing} neither returned nor raised within {deadline_s} s (hung or crashed)"
    return outcome


def assert_all_ok(outcome):
    bad = {rank: value for rank, (status, value, _) in outcome.items() if status != "ok"}
    assert not bad, "\n".join(f"rank {rank}: {value}" for rank, value in bad.items())
    return {rank: value for rank, (_, value, _) in outcome.items()}


# -- the workloads: a sinusoid MLP under MAML, a conv net with BatchNorm under ModelAwareMAML --------

CASES = {
    # name: (learner kind, T). T odd gives uneven shards (3 + 2).
    "maml-even": ("maml", 4),
    "maml-odd": ("maml", 5),
    "model-aware-even": ("model-aware", 4),
    "model-aware-odd": ("model-aware", 5),
}
META_STEPS = 5
OUTER_LR = 0.01  # large enough that 5 Adam steps move every parameter far beyond the tolerance


def _random_image_tasks(seed: int = 3) -> FewShotTasks:
    generator = torch.Generator().manual_seed(seed)
    classes, per_class = 6, 4
    images = torch.randint(0, 256, (classes * per_class, 1, 8, 8), dtype=torch.uint8, generator=generator)
    class_start = torch.arange(classes, dtype=torch.int64) * per_class
    class_count = torch.full((classes,), per_class, dtype=torch.int64)
    return FewShotTasks(images, class_start, class_count, ways=3, shots=1, queries=2, seed=seed)


def build_case(kind: str):
    """(learner, sampler) in float64; the same weights in every process (seeded)."""
    torch.manual_seed(0)
    if kind == "maml":
        model = fm.models.mlp((1, 16, 16, 1)).double()
        return fm.MAML(model, lr=0.01, steps=1), SinusoidTasks(shots=5, queries=5, seed=7)
    model = fm.models.conv4(in_channels=1, ways=3, hidden=4, variant="strided", image_size=8).double()
    learner = fm.ModelAwareMAML(model, lr=0.1, steps=2, lr_mode="layer", gates=True)
    return learner, _random_image_tasks()


def sample(sampler, iteration: int, tasks) -> list[torch.Tensor]:
    return [t.double() if t.is_floating_point() else t for t in sampler.sample(iteration, tasks)]


def train_single_process(kind: str, num_tasks: int) -> list[torch.Tensor]:
    learner, sampler = build_case(kind)
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    for iteration in range(META_STEPS):
        optimizer.zero_grad(set_to_none=True)
        learner.meta_batch(*sample(sampler, iteration, range(num_tasks))).loss.backward()
        optimizer.step()
    return [p.detach().clone() for p in learner.parameters()]


def _train_sharded(context, kind: str, num_tasks: int, perturb_rank_0: bool = False):
    learner, sampler = build_case(kind)
    if perturb_rank_0 and context.rank == 0:
        with torch.no_grad():  # broadcast from rank 0 must make everyone start from this
            next(learner.parameters()).add_(0.5)
    parallel = fmd.TaskParallel(learner, context)
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    losses = []
    for iteration in range(META_STEPS):
        optimizer.zero_grad(set_to_none=True)
        with parallel.meta_step(num_tasks) as step:
            step.backward(learner.meta_batch(*sample(sampler, iteration, step.tasks)))
        optimizer.step()
        losses.append(step.loss.item())
    fmd.verify_replicas(learner, context, optimizer)
    return {"params": [p.detach().clone() for p in learner.parameters()], "shard": step.tasks, "losses": losses}


def _equivalence_job(context):
    return {name: _train_sharded(context, kind, num_tasks) for name, (kind, num_tasks) in CASES.items()}


@pytest.fixture(scope="module")
def sharded_results():
    # One spawn for all four cases: process start-up (importing torch) dominates their cost.
    return assert_all_ok(run_ranks(_equivalence_job))


# -- (a) two ranks with T/2 tasks each == one process with T tasks ------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_after_five_adam_steps(case, sharded_results):
    kind, num_tasks = CASES[case]
    expected = train_single_process(kind, num_tasks)
    learner, _ = build_case(kind)
    initial = [p.detach() for p in learner.parameters()]
    for rank in range(WORLD):
        result = sharded_results[rank][case]
        assert result["shard"] == fmd.shard_range(num_tasks, rank, WORLD)
        assert len(result["params"]) == len(expected)
        for index, (got, want) in enumerate(zip(result["params"], expected)):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=lambda m: f"rank {rank} parameter {index}: {m}")
    # The comparison is not vacuous: training moved the parameters far beyond 1e-6.
    moved = max((p - p0).abs().max().item() for p, p0 in zip(expected, initial))
    assert moved > 1e-3
    # Both ranks report the same global loss each step (the mean over all T tasks).
    assert sharded_results[0][case]["losses"] == sharded_results[1][case]["losses"]


def test_uneven_shards_need_the_task_count_weighting():
    """With T=5 over 2 ranks, the plain mean of the two ranks' mean gradients is not the
    single-process gradient, so the odd-T cases above do test the n_r / T weighting."""
    learner, sampler = build_case("maml")
    batch = sample(sampler, 0, range(5))
    grads = []
    for tasks in (range(0, 3), range(3, 5), range(0, 5)):
        learner.zero_grad(set_to_none=True)
        learner.meta_batch(*[t[tasks.start : tasks.stop] for t in batch]).loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in learner.parameters()]))
    first, second, whole = grads
    torch.testing.assert_close(3 / 5 * first + 2 / 5 * second, whole, rtol=0, atol=1e-12)
    assert (0.5 * first + 0.5 * second - whole).abs().max() > 1e-4


def test_shard_range_covers_tasks_contiguously():
    for num_tasks in range(1, 12):
        for world in range(1, num_tasks + 1):
            shards = [fmd.shard_range(num_tasks, rank, world) for rank in range(world)]
            assert [i for s in shards for i in s] == list(range(num_tasks))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="num_tasks=2 cannot be split over 3 ranks"):
        fmd.shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank must lie in"):
        fmd.shard_range(4, 2, 2)


# -- replicas: broadcast at start, verification ----------------------------------------------------------


def _broadcast_and_verify_job(context):
    learner, _ = build_case("model-aware")
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(float(context.rank))  # every rank starts different
    fmd.TaskParallel(learner, context)  # broadcasts rank 0's
    fmd.verify_replicas(learner, context)
    with torch.no_grad():
        if context.rank == 1:
            learner.gate_logits[3] += 1e-9  # one element, one ulp-scale change
    try:
        fmd.verify_replicas(learner, context)
    except fmd.ReplicaMismatchError as error:
        return str(error)
    return None


def test_broadcast_equalises_replicas_and_verify_names_a_differing_tensor():
    messages = assert_all_ok(run_ranks(_broadcast_and_verify_job))
    for rank in range(WORLD):
        assert messages[rank] is not None, f"rank {rank} did not detect the changed gate logit"
        assert "1 tensor(s) differ between ranks: gate_logits" in messages[rank]


def _gradient_presence_job(context):
    learner, sampler = build_case("maml")
    learner.register_parameter("unused", torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)))
    parallel = fmd.TaskParallel(learner, context)
    with parallel.meta_step(4) as step:
        step.backward(learner.meta_batch(*sample(sampler, 0, step.tasks)))
    return {name: p.grad is None for name, p in learner.named_parameters()}


def test_a_parameter_no_rank_differentiates_keeps_grad_none():
    """As in one process (where Adam then skips it), not a zero gradient that Adam would apply."""
    grad_is_none = assert_all_ok(run_ranks(_gradient_presence_job))
    for rank in range(WORLD):
        assert grad_is_none[rank].pop("unused") is True
        assert not any(grad_is_none[rank].values()), grad_is_none[rank]


# -- (c) sharded evaluation == single-process evaluation ----------------------------------------------


EVAL_TASKS = 7  # odd: uneven shards


def sinusoid_scores(learner, tasks: range) -> torch.Tensor:
    evaluation = SinusoidTasks(shots=5, queries=5, seed=7).evaluation_tasks(EVAL_TASKS, seed=0, query_points=20)
    batch = [t[tasks.start : tasks.stop].double() for t in evaluation.batch]
    with torch.no_grad():
        fast = learner.fast_weights(batch[0], batch[1], steps=3)
        prediction = learner.predict(fast, batch[2])
    return (prediction - batch[3]).pow(2).flatten(1).mean(1)


def _evaluation_job(context):
    learner, _ = build_case("maml")
    values = fmd.evaluate_sharded(lambda tasks: sinusoid_scores(learner, tasks), EVAL_TASKS, context)
    rows = fmd.gather_task_values(torch.arange(len(context.shard(EVAL_TASKS))).view(-1, 1) + 100 * context.rank, EVAL_TASKS, context)
    return {"values": values, "mean_ci": fmd.mean_ci95(values), "rows": rows}


def test_sharded_evaluation_equals_single_process_evaluation():
    results = assert_all_ok(run_ranks(_evaluation_job))
    learner, _ = build_case("maml")
    expected = sinusoid_scores(learner, range(EVAL_TASKS))
    mean, ci = fmd.mean_ci95(expected)
    assert ci > 0
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank]["values"], expected, rtol=0, atol=1e-12)
        got_mean, got_ci = results[rank]["mean_ci"]
        assert got_mean == pytest.approx(mean, abs=1e-12) and got_ci == pytest.approx(ci, abs=1e-12)
        # Global order, uneven shards (4 + 3), extra dims and integer dtype kept.
        assert results[rank]["rows"].tolist() == [[0], [1], [2], [3], [100], [101], [102]]


def test_mean_ci95_is_the_normal_interval():
    mean, ci = fmd.mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5
    assert ci == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)


# -- (b) a rank that raises stops every rank, with a clear error, without waiting for a timeout -----------


def _raise_inside_meta_step_job(context):
    learner, sampler = build_case("maml")
    parallel = fmd.TaskParallel(learner, context)
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    for iteration in range(META_STEPS):
        optimizer.zero_grad(set_to_none=True)
        with parallel.meta_step(4) as step:
            if context.rank == 1 and iteration == 2:
                raise ValueError("simulated bad task batch on rank 1")
            step.backward(learner.meta_batch(*sample(sampler, iteration, step.tasks)))
        optimizer.step()
    return "finished"


def test_a_rank_raising_inside_a_meta_step_stops_every_rank():
    outcome = run_ranks(_raise_inside_meta_step_job)
    assert outcome[1][0] == "ValueError" and "simulated bad task batch on rank 1" in outcome[1][1]
    status, message, seconds = outcome[0]
    assert status == "RankFailedError", message
    assert "meta-step 3 stopped on rank 0 because rank 1 of 2: ValueError: simulated bad task batch on rank 1" in message
    assert seconds < COLLECTIVE_TIMEOUT_S, "rank 0 only stopped at the collective timeout"


def _raise_outside_meta_step_job(context):
    learner, sampler = build_case("maml")
    parallel = fmd.TaskParallel(learner, context)
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)
    for iteration in range(META_STEPS):
        optimizer.zero_grad(set_to_none=True)
        with parallel.meta_step(4) as step:
            step.backward(learner.meta_batch(*sample(sampler, iteration, step.tasks)))
        optimizer.step()
        if context.rank == 1 and iteration == 1:
            raise OSError("simulated disk full while writing a checkpoint")
    return "finished"


def test_a_rank_raising_between_meta_steps_stops_every_rank():
    outcome = run_ranks(_raise_outside_meta_step_job)
    assert outcome[1][0] == "OSError"
    status, message, seconds = outcome[0]
    assert status == "RankFailedError", message
    assert "rank 1 of 2: OSError: simulated disk full while writing a checkpoint" in message
    assert seconds < COLLECTIVE_TIMEOUT_S, "rank 0 only stopped at the collective timeout"


def _raise_in_evaluation_job(context):
    learner, _ = build_case("maml")

    def score(tasks):
        if context.rank == 0:
            raise RuntimeError("simulated evaluation failure on rank 0")
        return sinusoid_scores(learner, tasks)

    fmd.evaluate_sharded(score, EVAL_TASKS, context)
    return "finished"


def test_a_rank_raising_in_sharded_evaluation_stops_every_rank():
    outcome = run_ranks(_raise_in_evaluation_job)
    assert outcome[0][0] == "RuntimeError"
    status, message, seconds = outcome[1]
    assert status == "RankFailedError", message
    assert "evaluation stopped on rank 1 because rank 0 of 2: RuntimeError: simulated evaluation failure on rank 0" in message


def _stalled_rank_job(context):
    if context.rank == 1:
        time.sleep(5)  # stuck, not failed: only the collective timeout can end rank 0's wait
    learner, _ = build_case("maml")
    parallel = fmd.TaskParallel(learner, context, broadcast=False)
    with parallel.meta_step(4):
        pass
    return "finished"


def test_a_stalled_rank_ends_at_the_collective_timeout():
    outcome = run_ranks(_stalled_rank_job, timeout_s=2.0)
    status, message, seconds = outcome[0]
    assert status == "RankFailedError", message
    assert "meta-gradient all-reduce" in message and "timed out after 2 s" in message
    assert seconds < 7.0


# -- single process: no torchrun, no process group ---------------------------------------------------------


def test_world_size_one_runs_without_a_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    context = fmd.init_from_env(device="cpu")
    assert not context.is_distributed and context.world_size == 1 and context.is_main
    learner, sampler = build_case("maml")
    parallel = fmd.TaskParallel(learner, context)
    learner.zero_grad(set_to_none=True)
    with parallel.meta_step(5) as step:
        output = learner.meta_batch(*sample(sampler, 0, step.tasks))
        step.backward(output)
    assert step.tasks == range(5) and step.loss.item() == output.loss.item()


def test_meta_step_rejects_an_output_of_the_wrong_shard(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = fmd.init_from_env(device="cpu")
    learner, sampler = build_case("maml")
    parallel = fmd.TaskParallel(learner, context)
    with pytest.raises(ValueError, match=r"output holds 3 tasks but this rank's shard is 5 tasks"):
        with parallel.meta_step(5) as step:
            step.backward(learner.meta_batch(*sample(sampler, 0, range(3))))


def test_init_from_env_names_the_missing_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set"):
        fmd.init_from_env(device="cpu")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 must lie in \[0, WORLD_SIZE=2\)"):
        fmd.init_from_env(device="cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="backend='nccl' needs device='cuda'"):
        fmd.init_from_env(device="cpu", backend="nccl")


# -- (d) the training loop and the CLI under torchrun -------------------------------------------------------


def _sinusoid_config(iterations: int):
    from fastmeta.tools import training

    return dataclasses.replace(
        training.PRESETS["sinusoid"], iterations=iterations, meta_batch=5, log_every=1, checkpoint_every=2,
        validate_every=1, validation_tasks=5,
        outer_lr_schedule="constant",  # the cosine spans a run's iterations: a longer resume reshapes it
    )


def _train_and_resume_job(context, shared_out: str, rank_1_out: str):
    from fastmeta.tools import training

    said = []
    first_out = shared_out if context.is_main else rank_1_out  # rank 1 must not create its folder
    training.train(_sinusoid_config(2), first_out, device="cpu", test_tasks=7, progress=False, echo=said.append)
    training.train(_sinusoid_config(3), shared_out, resume=True, device="cpu", test_tasks=7, progress=False, echo=said.append)
    return said


def test_training_resumes_distributed_and_only_rank_0_writes(tmp_path):
    from fastmeta import checkpoint
    from fastmeta.tools import training

    shared, rank_1_out = tmp_path / "run", tmp_path / "rank-1-must-not-write"
    said = assert_all_ok(run_ranks(_train_and_resume_job, str(shared), str(rank_1_out)))
    assert not rank_1_out.exists(), "rank 1 created or wrote its run folder"
    assert said[1] == [], f"rank 1 printed: {said[1]}"
    assert any("resuming sinusoid from iteration 2 of 3" in line for line in said[0])

    # One writer: each iteration logged once, across the resume (2 iterations, then 1 more).
    records = training.read_metrics(shared)
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [1]  # not at a run's last iteration
    # The same run in one process, without a resume, reaches the same weights.
    single = tmp_path / "single"
    training.train(_sinusoid_config(3), single, device="cpu", test_tasks=7, progress=False, echo=lambda *a: None)
    got = checkpoint.load(shared / training.CHECKPOINT_NAME)["learner"]
    want = checkpoint.load(single / training.CHECKPOINT_NAME)["learner"]
    assert got.keys() == want.keys()
    for name in want:
        # float32, and the two ranks' partial means are summed in another order than one process's.
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    single_losses = [r["loss"] for r in training.read_metrics(single) if r["kind"] == "train"]
    assert [r["loss"] for r in records if r["kind"] == "train"] == pytest.approx(single_losses, rel=1e-5)


def test_fastmeta_train_nproc_2_runs_under_torchrun(tmp_path):
    """`fastmeta train --nproc 2` re-launches itself with torch.distributed.run (-m fastmeta)."""
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "fastmeta", "train", "sinusoid", "--iterations", "3", "--nproc", "2", "--out", str(out),
        "--test-tasks", "10", "--log-every", "1", "--no-progress", "--threads", "1",
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=90, env=environment, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("fastmeta: trained 3 iterations") == 1, finished.stdout  # rank 0 only
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["train"] * 3 + ["test"] * 3


# A rank as `fastmeta train` runs it, in a fresh interpreter (the forkserver of run_ranks
# imports torch._dynamo before any group exists, which hides the defect): join, build the
# first optimizer (it imports torch._dynamo, and through it torch.distributed.nn), gather,
# close. The gather's sent tensor is freed by the gloo worker after the gather completed
# (rank 1 starts its half only once rank 0 has dropped every reference), and freeing it
# takes 1.5 s there: a worker left behind by the scheduler, as on the loaded machine.
_CLOSE_JOB = """
import json, os, sys, threading, time, weakref
import torch
import torch.distributed as dist
from fastmeta import distributed

def gloo_threads():
    tasks = "/proc/self/task"
    names = (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)) if os.path.isdir(tasks) else ()
    return sorted(name for name in names if "gloo" in name)

freed = {}

def late_release(sleep=time.sleep):
    freed["in_main_thread"] = threading.get_ident() == threading.main_thread().ident
    sleep(1.5)
    freed["done"] = True

def gather_freed_late(context):
    store = dist.distributed_c10d._get_default_store()
    send = torch.full((1,), float(context.rank))
    weakref.finalize(send, late_release).atexit = False  # only where the tensor is freed
    gathered = [torch.full((1,), -1.0) for _ in range(context.world_size)]
    if context.rank == 1:
        store.wait(["rank 0 dropped its tensor"])
    dist.all_gather(gathered, send, async_op=True)  # the work handle is dropped at once
    del send
    if context.rank == 0:
        store.set("rank 0 dropped its tensor", "1")
    while gathered[1 - context.rank].item() != 1 - context.rank:
        time.sleep(0.01)
    return [t.item() for t in gathered]

nn_imported_first = "torch.distributed.nn" in sys.modules
with distributed.init_from_env("cpu", timeout=120) as context:
    group = weakref.ref(dist.group.WORLD)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    gathered = gather_freed_late(context)
    running = gloo_threads()
with open(f"rank{context.rank}.json", "w") as report:  # in the working directory
    json.dump({"rank": context.rank, "nn_imported_first": nn_imported_first, "gathered": gathered,
               "group_freed": group() is None, "running": running, "after_close": gloo_threads(),
               "freed_in_main_thread": freed.get("in_main_thread"), "freed_before_close_returned": freed.get("done", False)},
              report)

class ShutdownWaitsForTheWorker:
    # Collected by the interpreter's last garbage collection, once it is finalizing: a
    # worker still running then takes the GIL during finalization, as the late worker of
    # issue 26 did (before the fix this crashed every time).
    def __del__(self, freed=freed, sleep=time.sleep, clock=time.monotonic):
        deadline = clock() + 10.0
        while "done" not in freed and clock() < deadline:
            sleep(0.01)

import gc
gc.set_threshold(0)  # no automatic collection: the cycle below waits for the one at shutdown
shutdown_waits = ShutdownWaitsForTheWorker()
shutdown_waits.cycle = shutdown_waits
del shutdown_waits
"""


def test_closing_the_context_joins_a_late_gloo_worker(tmp_path):
    """Issue 26: rank 0 of `fastmeta train --nproc 2` aborted ("terminate called without an
    active exception", exit -6) after printing its results. The core dump: a gloo worker
    (ProcessGroupGloo::runLoop), freeing the last all_gather's tensors after the gather had
    returned, took the GIL while the interpreter finalized and was ended there (pthread_exit
    unwinding a noexcept destructor). Its threads were alive at exit because
    destroy_process_group left the group alive: torch.distributed.nn.functional, imported
    after init_process_group by the first optimizer, holds it as the default of its
    `group=` arguments. Here the worker is made late on purpose, and the interpreter's
    shutdown waits for it: before the fix, close returned without it, the group outlived
    close, and the worker's return to Python during finalization crashed rank 0 every time
    (SIGSEGV in this form, where the worker resumes Python code; SIGABRT in the wild, where
    it entered from C++). Now close frees the group and waits for its workers."""
    script = tmp_path / "close_job.py"
    script.write_text(_CLOSE_JOB)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert "terminate called" not in finished.stderr, finished.stderr[-3000:]
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        # The defect's precondition: torch.distributed.nn was not imported before joining
        # (had it been, its defaults would be None and the group never held).
        assert not result["nn_imported_first"], result
        assert result["gathered"] == [0.0, 1.0], result
        assert result["group_freed"], f"rank {result['rank']}: the process group outlived destroy_process_group: {result}"
        assert result["freed_before_close_returned"], f"rank {result['rank']}: close returned before the worker was done: {result}"
        if os.path.isdir("/proc/self/task"):  # Linux names the threads; torch calls gloo's pt_gloo_runloop
            assert any("gloo" in name for name in result["running"]), result  # so the check below can fail
            assert result["after_close"] == [], f"rank {result['rank']}: gloo threads left running after close: {result}"
    # Rank 0 dropped everything before rank 1 started: its worker freed the tensor, late.
    assert results[0]["freed_in_main_thread"] is False, results[0]


def test_nproc_inside_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    with pytest.raises(ValueError, match="--nproc cannot be used inside torchrun"):
        fmd.launch(2, ["train", "sinusoid"])
    with pytest.raises(ValueError, match="--nproc must be a positive integer, got 0"):
        fmd.launch(0, ["train", "sinusoid"])


def _resume_from_different_folders_job(context, with_checkpoint: str, without_checkpoint: str):
    from fastmeta.tools import training

    out = with_checkpoint if context.is_main else without_checkpoint
    training.train(_sinusoid_config(3), out, resume=True, device="cpu", test_tasks=7, progress=False, echo=lambda *a: None)
    return "trained"


def test_resume_where_a_rank_sees_no_checkpoint_fails_clearly(tmp_path):
    """A multi-node --resume whose --out is not shared: rank 1 finds no checkpoint."""
    from fastmeta.tools import training

    with_checkpoint, without_checkpoint = tmp_path / "run", tmp_path / "elsewhere"
    training.train(_sinusoid_config(2), with_checkpoint, device="cpu", test_tasks=7, progress=False, echo=lambda *a: None)
    outcome = run_ranks(_resume_from_different_folders_job, str(with_checkpoint), str(without_checkpoint))
    for rank in range(WORLD):
        status, message, _ = outcome[rank]
        assert status == "ReplicaMismatchError", message
        assert "ranks hold different numbers of tensors" in message

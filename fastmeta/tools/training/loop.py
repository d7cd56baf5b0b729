"""The training loop behind ``fastmeta train``: iterations (eager or as whole steps),
logging, validation, checkpoints, stopping on a signal, and the final test."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastmeta import checkpoint, distributed
from fastmeta.data import TaskBatch
from fastmeta.engine.whole_step_policy import WholeStep, set_outer_lr
from fastmeta.tools.schedules import iteration_schedule
from fastmeta.tools.training.evaluation import evaluate, format_results, result_records
from fastmeta.tools.training.metrics import METRICS_NAME, MetricsLog, _NoMetrics
from fastmeta.tools.training.presets import RunConfig
from fastmeta.tools.training.run import CHECKPOINT_NAME, Run, check_run_folder, read_run_checkpoint, splits_used
from fastmeta.tools.training.signals import Stopped, _StopRequest


def resume_message(preset: str, start: int, iterations: int) -> str:
    """The line a resumed run prints; one past its --iterations says there is nothing left to train."""
    if start >= iterations:
        return (f"fastmeta: resuming {preset} at iteration {start}, already past --iterations {iterations}: "
                "no iterations left to train")
    return f"fastmeta: resuming {preset} from iteration {start} of {iterations}"


def _meta_batches(sampler, iterations: range, tasks: range) -> Iterator[TaskBatch]:
    """Each iteration's meta-batch in turn, drawn ``sample_block`` iterations at a time.

    On a GPU a draw is launch-bound, so blocks of up to 64 MiB amortise its two dozen
    launches over many iterations. On the CPU a block pays off only while it stays
    cache-sized: drawn in blocks, W1's meta-batches measured 4x faster (blocks of 256,
    4 KiB each), W2's 3x slower (blocks of 64, 1 MiB each); hence a 1 MiB budget there.
    """
    if not iterations:
        return
    first = sampler.sample(iterations[0], tasks)
    yield first
    per_iteration = sum(t.numel() * t.element_size() for t in first)
    budget = (64 << 20) if first.support_x.is_cuda else (1 << 20)
    block = max(1, min(256, budget // per_iteration))
    if block == 1:
        for iteration in iterations[1:]:
            yield sampler.sample(iteration, tasks)
        return
    for begin in range(iterations[0] + 1, iterations.stop, block):
        yield from sampler.sample_block(range(begin, min(begin + block, iterations.stop)), tasks)


def train(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    test_tasks: int = 600,
    progress: bool | None = None,
    echo=print,
    eager: bool = False,
) -> dict:
    """Train (or resume) a run in folder ``out``; returns the final test results.

    Iterations run as whole steps where they apply
    (:class:`fastmeta.engine.whole_step_policy.WholeStep`: a CUDA graph on a
    GPU, one fused C++ call for a plain MLP on the CPU); ``eager=True`` runs each one as
    ``meta_batch``, ``backward`` and ``optimizer.step()``.

    ``progress=None`` shows the tqdm bar when stderr is a terminal. Raises FileExistsError
    when ``out`` already holds a checkpoint and ``resume`` is False.

    Launched by torchrun, every rank calls this: each trains on its shard of every
    meta-batch (``fastmeta.distributed``), evaluation is split across ranks, and only rank
    0 writes files, prints and shows the bar. A rank that fails stops all of them.
    """
    with distributed.init_from_env(device) as context:  # one process, no torchrun: a world of 1
        return _train(config, out, context, resume=resume, test_tasks=test_tasks, progress=progress, echo=echo,
                      eager=eager)



def _train(config: RunConfig, out, context: distributed.DistributedContext, *, resume, test_tasks, progress, echo,
           eager=False) -> dict:
    device = context.device
    if not context.is_main:
        echo = lambda *args, **kwargs: None  # noqa: E731  (rank 0 speaks for the run)
        progress = False
    out = check_run_folder(out)
    checkpoint_path = out / CHECKPOINT_NAME
    start, elapsed_before, saved = 0, 0.0, None
    if checkpoint_path.exists():
        if not resume:
            raise FileExistsError(
                f"{out} already holds a run ({checkpoint_path}); pass --resume to continue it, or --out to start another"
            )
        saved_config, saved = read_run_checkpoint(checkpoint_path)
        config = dataclasses.replace(saved_config, iterations=config.iterations, data_path=config.data_path or saved_config.data_path)
        start, elapsed_before = saved["iteration"], saved["elapsed_seconds"]
    elif resume:
        echo(f"fastmeta: no checkpoint in {out}; starting from iteration 0")

    # Left by a writer that was killed, also when the kill came during the first checkpoint
    # write and only the temporary exists.
    for stale in checkpoint.stale_temporaries(checkpoint_path) if context.is_main else ():
        stale.unlink(missing_ok=True)
    run = Run(config, device)
    run.check_splits(splits_used(config, start))
    if saved is not None:
        run.restore(saved)
        echo(resume_message(config.preset, start, config.iterations))
    parallel = distributed.TaskParallel(run.learner, context)  # rank 0's weights everywhere
    # On --resume each rank read the checkpoint itself: Adam's state (with its step count)
    # shows they all read the same one. Called on every rank, resumed or not, so that a
    # rank that found no checkpoint fails here with a clear error instead of desynchronising.
    distributed.verify_replicas(run.learner, context, run.optimizer)
    created = context.is_main and not out.exists()
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train_loop(config, out, context, run, parallel, start, elapsed_before, saved, test_tasks, progress, echo,
                           eager)
    except BaseException:
        if created:
            remove_if_nothing_was_written(out)
        raise


def remove_if_nothing_was_written(out: Path) -> None:
    """Remove a run folder this run created when it failed before writing any result."""
    metrics = out / METRICS_NAME
    if metrics.exists() and metrics.stat().st_size == 0:
        metrics.unlink()
    try:
        out.rmdir()  # only if empty: a checkpoint or a logged line is kept
    except OSError:
        pass



def _whole_step(whole_step: WholeStep, learner, optimizer, schedule, batch):
    """This iteration's whole step (captured on its first use), or None: it runs eagerly."""
    if whole_step.wants_capture(schedule):
        try:
            whole_step.hold(schedule.first_order, learner.capture(optimizer, *batch, first_order=schedule.first_order))
        except ValueError as error:  # a model the whole step does not take trains eagerly
            whole_step.decline(str(error))
    return whole_step.step_for(schedule)


def _train_loop(config, out, context, run, parallel, start, elapsed_before, saved, test_tasks, progress, echo,
                eager=False) -> dict:
    checkpoint_path = out / CHECKPOINT_NAME
    # This rank's shard of every meta-batch (all of it in one process), drawn ahead in blocks.
    meta_batches = _meta_batches(run.sampler("train", config.seed), range(start, config.iterations), context.shard(config.meta_batch))
    metrics = MetricsLog(out / METRICS_NAME, keep_through=start if saved is not None else None) if context.is_main else _NoMetrics()
    learner, optimizer = run.learner, run.optimizer

    whole_step = WholeStep(optimizer, run.device, distributed=context.is_distributed, eager=eager)

    def save(iteration: int) -> None:
        whole_step.check_finite()  # before replacing the last good checkpoint
        if context.is_main:
            checkpoint.save(run.state(iteration, elapsed_before + time.perf_counter() - started), checkpoint_path)

    def validate(iteration: int) -> None:
        whole_step.check_finite()
        steps = config.validation_steps
        results = evaluate(run, "val", config.validation_tasks, (steps,), context=context)
        for record in result_records("val", iteration, config, config.validation_tasks, results):
            metrics.write(record)
        mean, ci, diverged = results[steps]
        shown = f"MSE {mean:.4f} ± {ci:.4f}" if config.is_regression else f"accuracy {100 * mean:.2f}% ± {100 * ci:.2f}%"
        if diverged:
            shown += f" ({diverged} of {config.validation_tasks} tasks diverged)"
        if context.is_main:
            bar.write(f"iteration {iteration}: validation {shown} after {steps} step{'s' if steps > 1 else ''}")

    started = time.perf_counter()
    window_start, window_iterations = started, 0
    loss_sum = torch.zeros((), device=run.device)
    accuracy_sum = torch.zeros((), device=run.device)
    accuracy_iterations = 0  # the CPU whole step returns no accuracy
    bar = tqdm(
        total=config.iterations, initial=start, desc=config.preset, unit="it", dynamic_ncols=True,
        disable=None if progress is None else not progress,  # None: shown on a terminal only
    )
    done = start
    try:
        with _StopRequest() as stop:
            for iteration in range(start, config.iterations):
                schedule = iteration_schedule(config, iteration)
                set_outer_lr(optimizer, schedule.outer_lr)
                batch = next(meta_batches)
                replay = _whole_step(whole_step, learner, optimizer, schedule, batch)
                if replay is not None:
                    output = replay(*batch)
                    step_loss = output.loss
                    step_accuracy = None if output.accuracy is None else output.accuracy.mean()
                    should_stop = stop.signal_number is not None
                else:
                    optimizer.zero_grad(set_to_none=True)
                    # This rank's shard of the meta-batch (all of it in one process); on exit the
                    # meta-gradient is the mean over all tasks on every rank, and a stop request
                    # on any rank stops every rank after this same iteration.
                    with parallel.meta_step(config.meta_batch,
                                            stop_requested=lambda: stop.signal_number is not None) as step:
                        output = learner.meta_batch(*batch, step_weights=schedule.step_weights,
                                                    first_order=schedule.first_order)
                        step.backward(output)
                    optimizer.step()
                    step_loss, step_accuracy, should_stop = step.loss, step.accuracy, step.should_stop
                # Summed on the device: reading a loss every iteration would sync the GPU.
                loss_sum += step_loss
                if step_accuracy is not None:
                    accuracy_sum += step_accuracy
                    accuracy_iterations += 1
                window_iterations += 1
                done = iteration + 1
                bar.update(1)

                if done % config.log_every == 0 or done == config.iterations:
                    whole_step.check_finite()
                    now = time.perf_counter()
                    record = {
                        "kind": "train",
                        "iteration": done,
                        "loss": loss_sum.item() / window_iterations,
                        "iterations_per_second": window_iterations / max(now - window_start, 1e-9),
                        "seconds": elapsed_before + now - started,
                        "outer_lr": schedule.outer_lr,
                        "execution": "eager" if replay is None else "whole-step",
                    }
                    postfix = {"loss": f"{record['loss']:.4f}"}
                    if accuracy_iterations:
                        record["accuracy"] = accuracy_sum.item() / accuracy_iterations
                        postfix["acc"] = f"{100 * record['accuracy']:.1f}%"
                    metrics.write(record)
                    bar.set_postfix(postfix, refresh=False)
                    loss_sum.zero_()
                    accuracy_sum.zero_()
                    accuracy_iterations = 0
                    window_start, window_iterations = now, 0
                if done % config.validate_every == 0 and done != config.iterations:
                    validate(done)
                if done % config.checkpoint_every == 0 or done == config.iterations or should_stop:
                    save(done)
                if should_stop:
                    bar.close()
                    echo(f"fastmeta: stopped at iteration {done}; checkpoint in {checkpoint_path} (continue with --resume)")
                    # A rank that got no signal itself stops because another rank was terminated.
                    raise Stopped(stop.signal_number or signal.SIGTERM)
        bar.close()
        if start >= config.iterations:
            echo(f"fastmeta: {out} has already run {start} of {config.iterations} iterations")
        whole_step.check_finite()
        total = elapsed_before + time.perf_counter() - started
        echo(f"fastmeta: trained {config.iterations} iterations in {total:.1f} s ({done - start} in this session)")
        results = evaluate(run, "test", test_tasks, config.test_steps, context=context)
        for record in result_records("test", done, config, test_tasks, results):
            metrics.write(record)
    finally:
        bar.close()
        metrics.close()
    echo(format_results(config, "test", test_tasks, results))
    return results

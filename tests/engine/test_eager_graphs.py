"""meta_batch's graphs (fastmeta.engine.eager_graphs): the cache policy on the CPU, with a
stand-in for the CUDA-graph capture, and the real capture against eager on a GPU.

The stand-in (:class:`RecordingCapture`) captures by running the forward and the backward
once and keeping their results as the static tensors; a replay runs the function again
and copies its results into those tensors, as a CUDA graph's replay rewrites them in
place. So every test here runs the cache's real plumbing (static inputs, the autograd
node, the gradient copies, the policy), and only the graph itself is stood in for.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastmeta as fm
from fastmeta.backends import get_backend
from fastmeta.engine.eager_graphs import CapturedPair
from fastmeta.engine.whole_step import WatchedState
from helpers import classification_tasks, conv_bn_pool_net, regression_tasks
from fastmeta.testing.reference_loop import relative_error

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def copy_into(static, fresh) -> None:
    with torch.no_grad():
        for s, f in zip(static, fresh):
            if s is not None:
                s.copy_(f)


class RecordingCapture:
    """A stand-in for CudaGraphCapture on the CPU that counts captures and replays."""

    device_type = "cpu"

    def __init__(self):
        self.captures = self.forward_replays = self.backward_replays = 0

    def __call__(self, forward, backward) -> CapturedPair:
        self.captures += 1
        output, grads = forward(), backward()

        def replay_forward():
            self.forward_replays += 1
            with torch.enable_grad():  # a graph replays recorded work; the stand-in records it again
                copy_into(output, forward())

        def replay_backward():
            self.backward_replays += 1
            copy_into(grads, backward())

        return CapturedPair(replay_forward, replay_backward, output, tuple(grads))


class FailingCapture:
    device_type = "cpu"

    def __call__(self, forward, backward):
        raise RuntimeError("operation not permitted when stream is capturing")


def graphed(learner, capture=None, **policy):
    graphs = learner.meta_batch_graphs
    graphs.capture = RecordingCapture() if capture is None else capture
    for name, value in policy.items():
        setattr(graphs, name, value)
    return learner


def make_learner(kind="maml", graphs=True, **options):
    torch.manual_seed(3)
    model = conv_bn_pool_net().double()
    if kind == "maml":
        learner = fm.MAML(model, 0.3, cuda_graphs=graphs, **options)
    else:
        learner = fm.ModelAwareMAML(model, 0.1, steps=2, lr_mode="layer", gates=True, cuda_graphs=graphs, **options)
    return graphed(learner) if graphs else learner


def tasks(seed=0, T=3, **shape):
    return classification_tasks(T=T, dtype=torch.float64, seed=seed, **shape)


def grads(learner):
    return [p.grad.clone() for p in learner.parameters()]


def assert_close(got, want, tolerance=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert relative_error(g, w) <= tolerance, relative_error(g, w)


def iteration(learner, batch, optimizer=None):
    out = learner.meta_batch(*batch)
    if optimizer is not None:
        optimizer.zero_grad()
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    return out


@pytest.fixture(autouse=True)
def reference_backend():
    """The plain-PyTorch kernels: the policy is what is tested, not the kernels."""
    with fm.use_backend("torch"):
        yield


# -- the cache: one capture per shape, replays after -----------------------------------------


def test_a_shape_runs_eagerly_once_is_captured_at_its_second_call_and_replayed_after():
    learner = make_learner()
    graphs, capture = learner.meta_batch_graphs, learner.meta_batch_graphs.capture
    iteration(learner, tasks(0))
    assert (capture.captures, graphs.replays, len(graphs)) == (0, 0, 0)
    assert "first call" in graphs.eager_reason
    for seed in range(1, 5):
        iteration(learner, tasks(seed))  # new tensors of the same shapes
        assert graphs.eager_reason is None
    assert (capture.captures, graphs.captures, len(graphs)) == (1, 1, 1)
    assert (graphs.replays, capture.forward_replays, capture.backward_replays) == (4, 4, 4)
    iteration(learner, tasks(0, T=2))  # another shape: eager once, then its own capture
    iteration(learner, tasks(1, T=2))
    assert (capture.captures, len(graphs)) == (2, 2)


@pytest.mark.parametrize("kind", ["maml", "model-aware"])
@pytest.mark.parametrize("first_order", [False, True])
def test_outputs_and_meta_gradients_equal_eager_while_the_parameters_train(kind, first_order):
    graph_learner, eager_learner = make_learner(kind), make_learner(kind, graphs=False)
    graph_learner.first_order = eager_learner.first_order = first_order
    graph_opt = torch.optim.Adam(graph_learner.parameters(), 1e-2)
    eager_opt = torch.optim.Adam(eager_learner.parameters(), 1e-2)
    for seed in range(4):
        got = iteration(graph_learner, tasks(seed), graph_opt)
        want = iteration(eager_learner, tasks(seed), eager_opt)
        assert_close([got.loss, got.task_loss, got.accuracy], [want.loss, want.task_loss, want.accuracy])
        assert_close(grads(graph_learner), grads(eager_learner))
    assert graph_learner.meta_batch_graphs.replays == 3
    assert not got.accuracy.requires_grad


def test_a_regression_mlp_and_a_loss_through_task_loss_equal_eager():
    """The upstream gradient reaches the graph through loss and task_loss alike."""
    torch.manual_seed(0)
    model = fm.models.mlp((1, 16, 16, 1)).double()
    graph_learner = graphed(fm.MAML(model, 0.01))
    eager_learner = fm.MAML(copy.deepcopy(model), 0.01, cuda_graphs=False)
    weights = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float64)
    for seed in range(3):
        batch = regression_tasks(dtype=torch.float64, seed=seed)
        for learner in (graph_learner, eager_learner):
            learner.zero_grad()
            out = learner.meta_batch(*batch)
            (3 * out.loss + (weights * out.task_loss).sum()).backward()
        assert_close(grads(graph_learner), grads(eager_learner))
    assert graph_learner.meta_batch_graphs.replays == 2


def test_two_meta_batches_summed_before_one_backward_equal_eager():
    """The second forward rewrites the static state; the first one's backward replays its
    own forward again first."""
    graph_learner, eager_learner = make_learner(), make_learner(graphs=False)
    for learner in (graph_learner, eager_learner):
        iteration(learner, tasks(0))  # seen once
        learner.zero_grad()
        first, second = learner.meta_batch(*tasks(1)), learner.meta_batch(*tasks(2))
        (first.loss + 2 * second.loss).backward()
    assert graph_learner.meta_batch_graphs.capture.forward_replays == 3  # two forwards, one redone
    assert_close(grads(graph_learner), grads(eager_learner))


# -- bounded, and eager when shapes keep changing --------------------------------------------


def test_the_cache_keeps_the_most_recently_used_graphs():
    learner = graphed(make_learner(), capacity=2)
    graphs = learner.meta_batch_graphs
    for T in (1, 2, 3):
        iteration(learner, tasks(0, T=T))
        iteration(learner, tasks(1, T=T))
    assert len(graphs) == 2 and graphs.captures == 3
    assert [key[0][0][0][0] for key in graphs.entries] == [2, 3]  # T = 1 was dropped
    iteration(learner, tasks(2, T=3))
    assert graphs.captures == 3 and graphs.recaptures == 0


def test_more_distinct_shapes_than_allowed_turns_the_graphs_off_with_one_warning():
    learner = graphed(make_learner(), max_shapes=2)
    graphs = learner.meta_batch_graphs
    iteration(learner, tasks(0, T=1))
    iteration(learner, tasks(1, T=1))
    iteration(learner, tasks(0, T=2))
    with pytest.warns(RuntimeWarning, match="more than 2 distinct input shapes"):
        iteration(learner, tasks(0, T=3))
    assert "more than 2 distinct input shapes" in graphs.off_reason and len(graphs) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(2):
            iteration(learner, tasks(seed, T=1))  # captured before: eager now, silently
    assert graphs.captures == 1 and graphs.replays == 1
    assert graphs.eager_reason.startswith("graphs are off for this learner")


def test_meta_batches_cycling_through_more_keys_than_kept_turn_the_graphs_off():
    learner = graphed(make_learner(), capacity=1)
    graphs = learner.meta_batch_graphs
    with pytest.warns(RuntimeWarning, match="cycle through more shapes"):
        for _ in range(3):
            for T in (1, 2):
                iteration(learner, tasks(0, T=T))
                iteration(learner, tasks(1, T=T))
    assert graphs.off_reason is not None and graphs.recaptures == 2


def test_options_that_change_at_every_call_are_never_captured():
    learner = make_learner("model-aware")
    graphs = learner.meta_batch_graphs
    for k in range(4):
        out = learner.meta_batch(*tasks(k), step_weights=[1.0 / (k + 1), 1.0])
        out.loss.backward()
    assert graphs.captures == 0 and "first call" in graphs.eager_reason
    for k in range(3):  # annealing over: one set of weights from now on
        learner.meta_batch(*tasks(k), step_weights=[0.0, 1.0]).loss.backward()
    assert graphs.captures == 1 and graphs.replays == 2


# -- eager where a graph cannot stand in for the call ------------------------------------------


def test_calls_a_graph_cannot_stand_in_for_run_eagerly_and_say_why():
    learner = make_learner()
    graphs = learner.meta_batch_graphs
    batch = tasks(0)
    for _ in range(2):
        with torch.no_grad():
            learner.meta_batch(*batch)
    assert "not recording" in graphs.eager_reason
    learner.meta_batch(*batch, task_chunk=1).loss.backward()
    assert "task_chunk" in graphs.eager_reason
    sx = batch[0].clone().requires_grad_(True)
    learner.meta_batch(sx, *batch[1:]).loss.backward()
    assert "requires grad" in graphs.eager_reason and sx.grad is not None
    assert graphs.captures == 0 and len(graphs.seen) == 0


def test_the_default_capture_leaves_the_cpu_eager():
    learner = fm.MAML(conv_bn_pool_net().double(), 0.3)
    for seed in range(3):
        iteration(learner, tasks(seed))
    graphs = learner.meta_batch_graphs
    assert "on cpu" in graphs.eager_reason and graphs.captures == 0


def test_a_capture_that_fails_turns_the_graphs_off_silently_and_the_call_runs_eagerly():
    graph_learner, eager_learner = graphed(make_learner(), FailingCapture()), make_learner(graphs=False)
    graphs = graph_learner.meta_batch_graphs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            got = iteration(graph_learner, tasks(seed))
            want = iteration(eager_learner, tasks(seed))
    assert "capture failed (RuntimeError: operation not permitted" in graphs.off_reason
    assert torch.equal(got.loss, want.loss)


def test_the_flag_and_the_environment_turn_the_graphs_off(monkeypatch):
    learner = fm.MAML(conv_bn_pool_net().double(), 0.3, cuda_graphs=False)
    iteration(learner, tasks(0))
    assert "_meta_batch_graphs" not in learner.__dict__
    monkeypatch.setenv("FASTMETA_CUDA_GRAPHS", "0")
    assert not fm.MAML(conv_bn_pool_net(), 0.3).cuda_graphs
    assert not fm.ModelAwareMAML(conv_bn_pool_net(), 0.3).cuda_graphs
    monkeypatch.setenv("FASTMETA_CUDA_GRAPHS", "1")
    assert fm.MetaSGD(conv_bn_pool_net(), 0.3).cuda_graphs
    on = make_learner()
    iteration(on, tasks(0))
    iteration(on, tasks(1))
    on.cuda_graphs = False
    iteration(on, tasks(2))
    assert on.meta_batch_graphs.replays == 1


def test_a_copy_of_the_learner_starts_without_graphs():
    learner = make_learner()
    iteration(learner, tasks(0))
    iteration(learner, tasks(1))
    twin = copy.deepcopy(learner)
    assert "_meta_batch_graphs" not in twin.__dict__
    twin.meta_batch_graphs.capture = RecordingCapture()
    iteration(twin, tasks(2))
    assert twin.meta_batch_graphs.captures == 0  # its own, seen once
    assert twin.meta_batch_graphs.watch.owner is twin


# -- validation stays outside the graph --------------------------------------------------------


def captured_learner(**options):
    learner = make_learner(**options)
    iteration(learner, tasks(0))
    iteration(learner, tasks(1))
    assert learner.meta_batch_graphs.captures == 1
    return learner


def test_validation_still_names_a_nan_input_and_a_label_out_of_range():
    learner = captured_learner()
    sx, sy, qx, qy = tasks(2)
    sx[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="support_x has NaN or Inf in task 1"):
        learner.meta_batch(sx, sy, qx, qy)
    sx, sy, qx, qy = tasks(2)
    qy[2, 0] = 7
    with pytest.raises(ValueError, match="query labels out of range"):
        learner.meta_batch(sx, sy, qx, qy)
    assert learner.meta_batch_graphs.replays == 1  # neither reached the graph


def test_a_non_finite_query_loss_is_named_by_the_eager_path():
    learner = captured_learner()
    with torch.no_grad():
        learner.module[-1].weight.fill_(float("inf"))  # in place: the graph reads it
    with pytest.raises(FloatingPointError, match="loss of task"):
        learner.meta_batch(*tasks(2))
    assert "non-finite query loss" in learner.meta_batch_graphs.eager_reason


def test_without_validation_a_nan_input_runs_through_the_graph():
    learner = captured_learner(validate=False)
    sx, sy, qx, qy = tasks(2)
    qx[0] = float("nan")
    out = learner.meta_batch(sx, sy, qx, qy)
    assert torch.isnan(out.task_loss[0]) and learner.meta_batch_graphs.replays == 2


# -- the rule for captured state: a change of what the graphs read drops them -----------------


def set_attribute(name, value):
    return lambda learner: setattr(learner, name, value)


def set_requires_grad(learner):
    learner.module[0].bias.requires_grad_(False)


def replace_memory(learner):
    weight = learner.module[-1].weight
    weight.data = weight.data.clone()


CHANGES = {
    "lr": (set_attribute("lr", 0.2), "learner.lr changed from 0.3 to 0.2"),
    "steps": (set_attribute("steps", 2), "learner.steps changed from 1 to 2"),
    "first_order": (set_attribute("first_order", True), "learner.first_order changed from False to True"),
    "eval": (lambda learner: learner.eval(), "the train/eval mode of the learner changed from True to False"),
    "submodule eval": (lambda learner: learner.module[1].eval(), "the train/eval mode of module 'module.1'"),
    "requires_grad": (set_requires_grad, "parameter 'module.0.bias'.requires_grad changed from True to False"),
    "memory": (replace_memory, "parameter 'module.8.weight' (its memory"),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_of_what_the_graphs_read_drops_them_and_the_next_capture_reads_it(change):
    apply, message = CHANGES[change]
    graph_learner, eager_learner = captured_learner(allow_nograd=True), make_learner(graphs=False, allow_nograd=True)
    graphs = graph_learner.meta_batch_graphs
    apply(graph_learner)
    apply(eager_learner)
    for seed in range(2, 5):
        graph_learner.zero_grad()
        eager_learner.zero_grad()
        got, want = iteration(graph_learner, tasks(seed)), iteration(eager_learner, tasks(seed))
        assert_close([got.loss, got.task_loss], [want.loss, want.task_loss])
        assert_close([p.grad for p in graph_learner.parameters() if p.grad is not None],
                     [p.grad for p in eager_learner.parameters() if p.grad is not None])
        if seed == 2:
            assert message in graphs.drop_reason and "first call" in graphs.eager_reason
    assert graphs.captures == 2 and graphs.replays == 3  # 1 + 2 after the new capture


def needs_extension():
    if not get_backend("cpu").available()[0]:
        pytest.skip("the C++ extension is not available")


def test_a_backend_change_drops_the_graphs():
    needs_extension()
    learner = captured_learner()
    with fm.use_backend("cpu"):
        iteration(learner, tasks(2))
    graphs = learner.meta_batch_graphs
    assert "the backend (fastmeta.use_backend) changed from 'torch' to 'cpu'" in graphs.drop_reason
    assert len(graphs) == 0


def test_a_matmul_precision_change_drops_the_graphs():
    learner = captured_learner()
    with fm.matmul_precision("tf32x3"):
        iteration(learner, tasks(2))
    graphs = learner.meta_batch_graphs
    assert "the matmul precision (fastmeta.set_matmul_precision) changed from 'ieee' to 'tf32x3'" \
        in graphs.drop_reason
    assert len(graphs) == 0


def test_an_unchanged_value_keeps_the_graphs():
    learner = captured_learner()
    learner.lr = 0.3
    learner.train()
    learner.validate = False  # read outside the graph
    iteration(learner, tasks(2))
    assert learner.meta_batch_graphs.drop_reason is None and learner.meta_batch_graphs.replays == 2


@pytest.mark.parametrize("change,message", [
    (lambda m: m.eval(), "the train/eval mode of the learner changed"),
    (lambda m: m.module[0].weight.requires_grad_(False), "parameter 'module.0.weight'.requires_grad changed"),
    (lambda m: fm.use_backend("torch"), "the backend"),  # restored by the enclosing use_backend
])
def test_the_same_rule_refuses_a_captured_cpu_step(change, message):
    needs_extension()
    torch.manual_seed(0)
    learner = fm.MAML(fm.models.mlp((1, 8, 1)), 0.01, allow_nograd=True)
    optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
    with fm.use_backend("cpu"):
        step = learner.capture(optimizer, *regression_tasks())
        step(*regression_tasks(seed=1))
        change(learner)
        with pytest.raises(RuntimeError, match=message):
            step(*regression_tasks(seed=2))


def test_the_watched_optimizer_hyperparameters_are_its_non_tensor_ones():
    learner = make_learner()
    optimizer = torch.optim.Adam(learner.parameters(), torch.tensor(1e-3), betas=(0.9, 0.999), foreach=False)
    watch = WatchedState(learner, ["lr"], learner.named_modules(), optimizer)
    optimizer.param_groups[0]["lr"].fill_(5e-4)  # a tensor: read at every replay
    assert watch.change() is None
    optimizer.param_groups[0]["betas"] = (0.8, 0.999)
    assert watch.change() == "optimizer.param_groups[0]['betas'] changed from (0.9, 0.999) to (0.8, 0.999)"
    watch.rebase()
    optimizer.param_groups[0]["weight_decay"] = 0.1
    assert watch.change() == "optimizer.param_groups[0]['weight_decay'] changed from 0 to 0.1"
    watch.rebase()
    optimizer.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    assert "optimizer" in watch.change()


# -- the real capture, on a GPU ----------------------------------------------------------------


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["maml", "model-aware"])
def test_cuda_graphs_equal_eager_in_a_plain_loop(kind):
    """The user's loop on a GPU: meta_batch, backward, Adam, with and without graphs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = fm.models.conv4(image_size=28, ways=5).cuda()

    def make(m, graphs):
        if kind == "maml":
            return fm.MAML(m, 0.4, cuda_graphs=graphs)
        return fm.ModelAwareMAML(m, 0.1, steps=2, gates=True, cuda_graphs=graphs)

    graph_learner, eager_learner = make(model, True), make(copy.deepcopy(model), False)
    eager_learner.load_state_dict(graph_learner.state_dict())
    graph_opt = torch.optim.Adam(graph_learner.parameters(), 1e-3)
    eager_opt = torch.optim.Adam(eager_learner.parameters(), 1e-3)
    batches = [[t.cuda() for t in classification_tasks(T=8, ways=5, shots=1, queries=3, image=28, seed=s)]
               for s in range(6)]
    for k, batch in enumerate(batches):
        got = iteration(graph_learner, batch, graph_opt)
        want = iteration(eager_learner, batch, eager_opt)
        # The first replay (k = 1) runs eager's kernels on eager's parameters; later
        # iterations drift as two eager runs do (fp32 reduction order through Adam).
        tolerance = 1e-5 if k <= 1 else 1e-3
        assert relative_error(got.task_loss, want.task_loss) <= tolerance
        if k <= 1:
            assert_close(grads(graph_learner), grads(eager_learner), 1e-4)
    graphs = graph_learner.meta_batch_graphs
    assert graphs.off_reason is None, graphs.off_reason
    assert graphs.captures == 1 and graphs.replays == len(batches) - 1
    sx, sy, qx, qy = [t.clone() for t in batches[0]]
    sx[3, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="support_x has NaN or Inf in task 3"):
        graph_learner.meta_batch(sx, sy, qx, qy)
    graph_learner.lr = 0.2  # dropped and captured again
    for batch in batches[:3]:
        iteration(graph_learner, batch, graph_opt)
    assert graphs.captures == 2 and "learner.lr changed" in graphs.drop_reason

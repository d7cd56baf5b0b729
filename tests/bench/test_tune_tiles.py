"""bench/tune_tiles.py's parts (its dry run is gpu_check's ``tune`` step, tests/bench/test_gpu_check.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tune_tiles():
    return load_script(REPO / "bench" / "tune_tiles.py", "tune_tiles")


def test_candidates_vary_one_setting_each(tune_tiles):
    base = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "num_warps": 4, "num_stages": 3}
    out = tune_tiles.candidates(base, 12)
    assert out[0] == base and len(out) == len({tuple(sorted(c.items())) for c in out})
    assert all(sum(c[k] != base[k] for k in base) == 1 for c in out[1:])
    assert {"SPLIT_K": 1} in [{k: v for k, v in c.items() if v != base[k]} for c in out]
    assert all(16 <= c["BLOCK_M"] <= 128 and 16 <= c["BLOCK_N"] <= 128 and c["num_warps"] <= 8 for c in out)
    assert not any(c["BLOCK_N"] == 8 for c in out)  # a side below 16 is no candidate
    assert tune_tiles.candidates(base, 2) == out[:2]
    # The rule's tiles without split-K come second, whole.
    unsplit = {**base, "BLOCK_M": 16, "SPLIT_K": 1, "num_warps": 1}
    assert tune_tiles.candidates(base, 3, unsplit)[:2] == [base, unsplit]
    assert tune_tiles.candidates(base, 12, dict(base)) == out  # the plan does not split: nothing new


def test_the_unsplit_rule_shrinks_tiles_instead(tune_tiles):
    from fastmeta.kernels.tiles import plan_config

    # W2's last conv with the shared meta-parameters: split 4 with 16 x 32 tiles; unsplit,
    # 16 x 16 tiles (the most busy programs without a split).
    split = plan_config("conv_forward", 1, ((640, 576),), 64)
    unsplit = tune_tiles.unsplit_config(1, 640, 64, 576, kernel="conv_forward", sm_count=132)
    assert (split["BLOCK_M"], split["BLOCK_N"], split["SPLIT_K"]) == (16, 32, 4)
    assert (unsplit["BLOCK_M"], unsplit["BLOCK_N"], unsplit["SPLIT_K"], unsplit["busy_programs"]) == (16, 16, 1, 160)


def test_the_table_of_a_sweep(tune_tiles):
    from fastmeta.kernels.tiles import check_table

    config = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "num_warps": 2, "num_stages": 3}
    tuned = {"conv_forward/b32/m256/n64/k1024": {
        "kernel": "task_conv2d", "calls": 2, "issued_macs": 1,
        "candidates": [{"config": config, "ms": 0.02, "status": "ok"}, {"config": config, "ms": None, "status": "wrong"}],
        "best": {"config": config, "ms": 0.02, "status": "ok"}},
        "conv_forward/b1/m8/n8/k8": {"kernel": "task_conv2d", "calls": 1, "issued_macs": 1, "candidates": [],
                                     "best": None}}
    table = check_table(tune_tiles.table_of(tuned, 132, "NVIDIA H100"))
    assert table["entries"] == {"conv_forward/b32/m256/n64/k1024": {**config, "ms": 0.02, "candidates": 1}}
    assert (table["sm_count"], table["device"]) == (132, "NVIDIA H100")


def test_the_table_carries_the_measured_backend_preference(tune_tiles):
    """Issue 24, item 4: the sweep's preference goes into the table, checked."""
    from fastmeta.kernels.tiles import check_table

    preference = {"task_linear": {"backend": "triton", "ms": {"triton": 0.5, "cuda": 0.9}, "classes": 3}}
    table = tune_tiles.table_of({}, 132, "NVIDIA H100", preference)
    assert table["preferences"] == preference
    assert "preferences" not in tune_tiles.table_of({}, 132, "NVIDIA H100", {})
    for bad in ({"backend": "cpu", "ms": {"cpu": 1.0}}, {"backend": "cuda", "ms": {"triton": 1.0}},
                {"backend": "cuda", "ms": {"cuda": 0.0}}, "cuda"):
        with pytest.raises(ValueError, match="tile table preference 'task_linear'"):
            check_table({**table, "preferences": {"task_linear": bad}})


def test_auto_tries_the_measured_backend_first_on_cuda_only():
    from fastmeta.backends import AUTO_PREFERENCE, auto_backends, invalidate_kernel_choices, preference_order
    from fastmeta.kernels import tiles

    default = AUTO_PREFERENCE["default"]
    assert preference_order("task_linear", "cuda") == default  # the committed table measured nothing yet
    table = {**tiles.load_table(), "preferences": {"task_linear": {"backend": "triton", "ms": {"triton": 1.0, "cuda": 2.0}}}}
    with tiles.using_table(table):
        invalidate_kernel_choices()
        try:
            assert preference_order("task_linear", "cuda") == ("triton", *[n for n in default if n != "triton"])
            assert preference_order("task_linear_backward", "cuda")[0] == "triton"  # the whole family
            assert preference_order("task_conv2d", "cuda") == default  # another family
            assert preference_order("task_linear", "cpu") == default  # a CUDA measurement
            # The CUDA path as a GPU would take it: triton first wherever both are verified.
            order = list(auto_backends("task_linear", "cuda", assume_available=True))
            assert order and order[0] == "triton", order
        finally:
            invalidate_kernel_choices()
    invalidate_kernel_choices()


def test_compare_backends_sums_each_backends_medians_over_the_linear_classes(tune_tiles, monkeypatch):
    """Step 5 on the CPU, under the interpreter, with a stand-in rival registered as a
    backend: each class's kept call runs on both, is checked, timed and weighted by its
    calls; a rival that declines, or is wrong, is left out of the sums; an unavailable
    rival writes no preference and says why."""
    from fastmeta.kernels.launch_checks import interpreting
    from fastmeta.backends import Backend, register_backend, unregister_backend
    from fastmeta.ops.task_linear import reference_task_linear, reference_task_linear_input_grad

    if not interpreting():
        pytest.skip("needs the Triton interpreter")
    import torch

    x, w = torch.randn(2, 4, 16), torch.randn(2, 16, 16)
    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1, "num_warps": 1, "num_stages": 1}
    classes = {
        "linear_forward/b2/m4/n16/k16": {"name": "task_linear", "args": [x, w, None, "none", 0.0], "calls": 3,
                                         "config": config},
        "linear_input_grad/b2/m4/n16/k16": {"name": "task_linear_input_grad", "args": [x, w], "calls": 2,
                                            "config": config},
        "conv_forward/b1/m8/n8/k8": {"name": "task_conv2d", "args": [], "calls": 1, "config": config},
    }
    tuned = {"linear_forward/b2/m4/n16/k16": {"best": {"config": config, "ms": 0.25}}}
    # In class order: the rival on the tuned class (Triton's is its best, 0.25), then Triton
    # on the untuned class (its plan's configuration), then the rival there.
    timings = iter([0.125, 0.5, 0.75])
    monkeypatch.setattr(tune_tiles, "median_ms", lambda fn, repeats, device: (fn(), next(timings))[1])
    rival = Backend(name="rival-for-test", description="a stand-in", availability=lambda: (True, ""),
                    device_types=lambda: ("cpu",),
                    kernels={"task_linear": lambda *a: reference_task_linear(*a),
                             "task_linear_input_grad": lambda *a: reference_task_linear_input_grad(*a)})
    register_backend(rival)
    try:
        preferences, report = tune_tiles.compare_backends(classes, tuned, torch.device("cpu"), 3,
                                                         rival="rival-for-test", progress=lambda line: None)
        assert report["why"] is None and set(report["classes"]) == set(list(classes)[:2])
        p = preferences["task_linear"]
        # triton: 0.25 · 3 + 0.5 · 2 = 1.75; rival: 0.125 · 3 + 0.75 · 2 = 1.875
        assert p["ms"] == {"triton": 1.75, "rival-for-test": 1.875} and p["backend"] == "triton" and p["classes"] == 2
        # A rival that is wrong is not timed; with nothing compared, no preference.
        rival.kernels["task_linear"] = lambda *a: reference_task_linear(*a) + 1
        rival.kernels["task_linear_input_grad"] = lambda *a: NotImplemented
        timings = iter([0.5])
        preferences, report = tune_tiles.compare_backends(classes, tuned, torch.device("cpu"), 3,
                                                         rival="rival-for-test", progress=lambda line: None)
        assert preferences == {} and "no task_linear launch" in report["why"]
        assert report["classes"]["linear_forward/b2/m4/n16/k16"]["status"].startswith("wrong")
    finally:
        unregister_backend("rival-for-test")
    preferences, report = tune_tiles.compare_backends(classes, tuned, torch.device("cpu"), 3, rival="cuda")
    assert preferences == {} and "does not run on cpu" in report["why"]


def test_the_sweep_sees_the_launches_of_the_composed_backward_ops(tune_tiles):
    """The conv and linear backward ops are one op each: the sweep keeps each of their
    launches as a call of its single-GEMM launcher (so the input- and weight-gradient
    classes are tuned too), in the launchers' order."""
    import torch

    from fastmeta.kernels.launch_checks import interpreting
    from fastmeta.kernels.task_conv2d import conv_launch_plans

    if not interpreting():
        pytest.skip("needs the Triton interpreter (the launch planners take CPU tensors there)")
    x, w = torch.randn(2, 3, 4, 6, 6), torch.randn(2, 5, 4, 3, 3)
    gy = torch.randn(2, 3, 5, 3, 3)
    g_dx, g_dw = torch.randn_like(x), torch.randn_like(w)
    backward = (gy, x, w, [2, 2], [1, 1], [True, True])
    calls = tune_tiles.component_calls("task_conv2d_backward", backward)
    assert [name for name, _ in calls] == ["task_conv2d_input_grad", "task_conv2d_weight_grad"]
    assert len(calls) == len(conv_launch_plans("task_conv2d_backward", *backward, grouped=False))
    double = (g_dx, g_dw, gy, x, w, [2, 2], [1, 1], [True, True, True])
    assert [name for name, _ in tune_tiles.component_calls("task_conv2d_double_backward", double)] == [
        "task_conv2d_two_terms", "task_conv2d_input_grad", "task_conv2d_weight_grad"]
    # Without g_dx, d grad_out is the one forward that has its upstream.
    assert [name for name, _ in tune_tiles.component_calls(
        "task_conv2d_double_backward", (None, *double[1:]))] == ["task_conv2d", "task_conv2d_input_grad"]
    # Each kept call runs on its launcher as the composed op's launch would.
    for name, args in calls:
        assert tune_tiles.launcher(name)(*args) is not NotImplemented
    lx, lw, lg = torch.randn(2, 3, 4), torch.randn(5, 4), torch.randn(2, 3, 5)
    assert tune_tiles.component_calls("task_linear_backward", (lg, lx, lw, [True, False])) == [
        ("task_linear_input_grad", (lg, lw))]
    names = [n for n, _ in tune_tiles.component_calls(
        "task_linear_double_backward", (None, torch.randn(5, 4), lg, lx, lw, [True, True, True]))]
    assert names == ["task_linear", "task_linear_input_grad"]  # no g_dx: one product, no d w
    with pytest.raises(ValueError, match="not a GEMM-like launcher"):
        tune_tiles.component_calls("inner_step", ())

"""The kernel table (fastmeta/backends/table.py): every op's kernels are defined once and
every backend registers against it by name; every kernel declines what it does not take."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import fastmeta as fm
from fastmeta import ops
from fastmeta.backends import get_backend
from fastmeta.backends.table import FAMILIES, TABLE, families
from harness import HAS_CUDA, backend_params, kernel_log, require, to

# The op modules of fastmeta/ops/: those that define ops (define_op). Each declares its family.
OP_MODULES = sorted(p.stem for p in (Path(fm.__file__).parent / "ops").glob("*.py")
                    if p.stem != "registration" and "= define_op(" in p.read_text())


def test_every_op_module_declares_its_family_with_a_sample_for_each_kernel():
    """The table's families are the op modules', each declared once (OpFamily), and every
    kernel has its sample arguments: a kernel without them fails here, never skips."""
    assert set(families()) == set(FAMILIES) == set(OP_MODULES)
    for family, kernels in families().items():
        declared = FAMILIES[family]
        assert declared.name == family
        assert set(declared.sample_args) == set(kernels), f"{family}: samples for {set(declared.sample_args)}, " \
                                                          f"kernels {kernels}"


def test_every_kernel_is_named_after_its_reference_and_owned_by_its_op_module():
    for name, spec in TABLE.items():
        assert spec.reference.__name__ == f"reference_{name}"
        assert spec.reference.__module__ == f"fastmeta.ops.{spec.family}"
        # The public op's schema is the kernel's, derived from the reference's annotations.
        schema = str(getattr(torch.ops.fastmeta, name).default._schema)
        assert schema == f"fastmeta::{name}{spec.schema}"
        params = list(inspect.signature(spec.reference).parameters)
        assert all(f" {p}" in spec.schema for p in params), (name, params, spec.schema)


def test_public_ops_are_registered_under_the_fastmeta_namespace():
    for name in ops.__all__:
        if name[0].islower() and name in TABLE:
            assert hasattr(torch.ops.fastmeta, name), name


# Families whose C++ CPU kernels sit in another family's source (csrc/cpu/<source>.cpp).
SOURCE_SHARED_WITH = {"mlp_meta_step_update": "mlp_meta_step", "task_batch_norm_max_pool2d": "task_batch_norm"}


def test_backends_register_only_kernels_of_the_table():
    from fastmeta.backends import extension

    require("cpu")
    assert set(extension.kernels("cpu")) <= set(TABLE)
    # The C++ sources implement the kernels of csrc/cpu/<family>.cpp's family on the CPU,
    # and every family but the fused MLP's (C++ on the CPU, CUDA on a GPU) has its Triton
    # kernels in kernels/<family>.py.
    csrc = Path(fm.__file__).parents[1] / "csrc" / "cpu"
    cpp_families = {p.stem for p in csrc.glob("*.cpp")} if csrc.is_dir() else set(FAMILIES)
    # The whole step's update sits in csrc/cpu/mlp_meta_step.cpp, on the meta-step's core,
    # and the pooled BatchNorm in csrc/cpu/task_batch_norm.cpp, on the BatchNorm's statistics.
    for family, source in SOURCE_SHARED_WITH.items():
        if source in cpp_families:
            cpp_families.add(family)
    assert set(extension.kernels("cpu")) == {n for n, s in TABLE.items() if s.family in cpp_families}
    triton = get_backend("triton")
    if triton.available()[0]:
        triton.kernel("inner_step")
        assert set(triton.kernels) <= set(TABLE)
        assert {n for n, s in TABLE.items()
                if s.family not in ("mlp_meta_step", "mlp_meta_step_update")} <= set(triton.kernels)


def test_backend_registry_reports_each_backend_with_a_reason():
    rows = {row["name"]: row for row in fm.backends()}
    assert {"torch", "triton", "cpu", "cuda"} <= set(rows)
    assert rows["torch"]["available"]
    for row in rows.values():
        assert row["available"] or row["reason"]
    with fm.use_backend("torch"):
        assert fm.current_backend() == "torch"


def sample_kernel_args(device):
    """One fp32 argument tuple per kernel of the table, as its op module declares it."""
    def move(a):
        return [move(t) for t in a] if isinstance(a, list) and a and torch.is_tensor(a[0]) else to([a], device)[0]

    return {name: tuple(move(a) for a in make()) for family in FAMILIES.values()
            for name, make in family.sample_args.items()}


def _as(args, dtype):
    """The float tensors among args, and those in lists of args, in ``dtype``."""
    def cast(a):
        if torch.is_tensor(a) and a.is_floating_point():
            return a.to(dtype)
        if isinstance(a, list) and a and all(torch.is_tensor(t) for t in a):
            return [cast(t) for t in a]
        return a

    return tuple(cast(a) for a in args)


@pytest.mark.parametrize("backend,device", backend_params("triton", "cpu", "cuda"))
def test_every_kernel_takes_its_fp32_sample_and_declines_float16_and_mixed_dtypes(backend, device):
    require(backend)
    b = get_backend(backend)
    b.kernel("inner_step")
    samples = sample_kernel_args(device)
    for name, args in samples.items():
        kernel = b.kernel(name)
        if kernel is None:
            continue
        assert kernel(*args) is not NotImplemented, f"{backend} {name} declined its fp32 sample"
        halved = _as(args, torch.half)
        assert kernel(*halved) is NotImplemented, f"{backend} {name} accepted float16"
        floats = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point() and a.dim() > 0]
        if len(floats) >= 2:
            mixed = list(args)
            mixed[floats[-1]] = mixed[floats[-1]].double()
            assert kernel(*mixed) is NotImplemented, f"{backend} {name} accepted mixed dtypes"


@pytest.mark.parametrize("backend,device", backend_params("triton", "cuda"))
def test_float64_is_declined_where_the_kernels_are_fp32(backend, device):
    """Triton and CUDA kernels are fp32: float64 runs the reference, never a lower precision."""
    require(backend)
    b = get_backend(backend)
    b.kernel("inner_step")
    for name, args in sample_kernel_args(device).items():
        kernel = b.kernel(name)
        if kernel is None:
            continue
        doubled = _as(args, torch.double)
        assert kernel(*doubled) is NotImplemented, f"{backend} {name} accepted float64"


@pytest.mark.parametrize("backend,device", backend_params("triton"))
@pytest.mark.parametrize(
    "op,args,diff",
    [
        (ops.inner_step, lambda: [torch.randn(5), torch.randn(2, 5), torch.rand(5), torch.rand(5), None, None],
         [0, 1, 2, 3]),
        (ops.task_linear, lambda: [torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3), "tanh", 0.0],
         [0, 1, 2]),
        (ops.task_conv2d, lambda: [torch.randn(2, 1, 2, 4, 4), torch.randn(2, 2, 2, 3, 3), None, [2, 2], [1, 1]],
         [0, 1]),
        (ops.task_batch_norm, lambda: [torch.randn(2, 3, 2, 2, 2), torch.randn(2, 2), torch.randn(2, 2), 1e-5,
                                       "sigmoid", 0.0], [0, 1, 2]),
        (ops.task_layer_norm, lambda: [torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(4), 1e-5], [0, 1, 2]),
        (ops.task_loss, lambda: [torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3)), "cross_entropy"], [0]),
    ],
    ids=["inner_step", "task_linear", "task_conv2d", "task_batch_norm", "task_layer_norm", "task_loss"],
)
def test_float64_falls_back_and_gradgradchecks(backend, device, op, args, diff):
    """float64 under the triton backend: every kernel declines, the reference answers, and
    gradgradcheck (fast mode) passes through that path."""
    values = to(args(), device, torch.float64)

    def fn(*inputs):
        full = list(values)
        for i, t in zip(diff, inputs):
            full[i] = t
        return op(*full)

    inputs = tuple(values[i].detach().requires_grad_(True) for i in diff)
    with kernel_log(backend) as (ran, declined), fm.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    assert not ran, f"a kernel accepted float64: {dict(ran)}"
    assert declined, "no kernel was asked: the test did not exercise the backend"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["task_linear", "task_linear_input_grad", "task_linear_weight_grad",
                                  "task_linear_backward", "task_linear_double_backward", "task_loss",
                                  "task_loss_grad", "task_loss_grad_backward", "inner_step"])
def test_public_ops_on_the_cuda_backend_pass_opcheck(name):
    from torch.library import opcheck

    args = tuple(a.requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                 for a in sample_kernel_args("cuda")[name])
    with fm.use_backend("cuda"):
        opcheck(getattr(ops, name), args)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_kernels_run_on_the_current_stream():
    from harness import direct

    x, w = torch.randn(4, 9, 33, device="cuda"), torch.randn(4, 17, 33, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = direct("cuda", "task_linear", x, w, None, "relu", 0.0)
    s.synchronize()
    torch.testing.assert_close(y, torch.relu(torch.bmm(x, w.transpose(1, 2))), rtol=1e-5, atol=1e-5)



def _gpu_check_driver():
    from helpers import load_script

    path = Path(fm.__file__).parents[1] / "bench" / "gpu_check.py"
    if not path.exists():
        pytest.fail(f"no GPU check at {path}")
    return load_script(path, "gpu_check_for_table")


def test_every_family_appears_in_every_derived_list(capsys):
    """Each list derived from the op table names every family: the kernels' samples (above),
    the GPU check's steps (a Triton or CUDA step per family, timed and with a dry-run case
    from the family's declaration), the verification record of the C++ CPU kernels, the
    traced program's modules and the README's backend table."""
    from fastmeta.backends import AUTO_PREFERENCE, verification

    require("triton")
    driver = _gpu_check_driver()
    exec(driver.CATALOG, {})  # the GPU check's catalog, as its child process prints it
    catalog = json.loads(capsys.readouterr().out.split("CATALOG ", 1)[1])
    steps = {s.name: s for s in driver.correctness_steps(False, catalog)}
    dry = {s.name: s for s in driver.correctness_steps(True, catalog)}
    readme = (Path(fm.__file__).parents[1] / "README.md").read_text()
    csrc = Path(fm.__file__).parents[1] / "csrc" / "cpu"
    recorded = set(verification.verified_ops("cpu").get("cpu", []))
    for family, kernels in families().items():
        declared = FAMILIES[family]
        assert set(catalog["families"][family]) == set(kernels)
        gpu_steps = [n for n in (f"triton:{family}", f"cuda:{family}") if n in steps]
        has_gpu_kernels = family in catalog.get("triton", {}) or (csrc.parent / "cuda" / f"{family}.cu").exists()
        # A family with no GPU kernel (the whole step's update: C++ on the CPU, its reference
        # elsewhere) has no GPU step of its own; every other family has one.
        assert bool(gpu_steps) == has_gpu_kernels, f"the GPU check's steps for {family}: {gpu_steps}"
        for n in gpu_steps:
            assert steps[n].estimate == declared.check_seconds, (n, steps[n].estimate)
        if f"triton:{family}" in steps:
            assert set(steps[f"triton:{family}"].records[1]) == set(kernels)
            command = dry[f"triton:{family}"].command(SimpleNamespace(python="python"))
            assert declared.dry_run_case and f"triton and ({declared.dry_run_case})" in command, command
        if (csrc / f"{SOURCE_SHARED_WITH.get(family, family)}.cpp").exists():
            cpu_picked = [k for k in kernels if "cpu" in AUTO_PREFERENCE.get(k, AUTO_PREFERENCE["default"])]
            assert set(cpu_picked) <= recorded, f"{family}: C++ CPU kernels not in verified.json"
        assert f"`{family}`" in readme or any(f"`{k}`" in readme for k in kernels), f"README lacks {family}"
    # The traced program's leaf modules include every module a family declares: a model of
    # them traces to one call_module node each, never into their forward.
    from fastmeta.engine import program

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Unflatten(-1, (1, 2, 2)),
                                torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.MaxPool2d(1), torch.nn.Flatten(),
                                torch.nn.BatchNorm1d(8))
    traced = program._Tracer().trace(model)
    leaves = {type(model.get_submodule(n.target)) for n in traced.nodes if n.op == "call_module"}
    declared = {t for d in FAMILIES.values() for t in d.modules}
    assert declared <= leaves, declared - leaves
    assert set(program.recognised_modules()) >= declared


def test_workload_op_shapes_follow_from_the_layers_as_their_families_declare():
    """WORKLOAD_OP_SHAPES (fastmeta/tools/workloads.py) against the W1–W4 models: every
    shape it lists for a family is one a layer of the workload's model gives through the
    family's ``layer_shapes``, and every family with a layer in a model is listed for it.
    The models run on the meta device: shapes only."""
    from fastmeta.tools.workloads import WORKLOAD_OP_SHAPES, WORKLOADS

    for name, workload in WORKLOADS.items():
        model = workload.build_model().to("meta")
        derived: dict[str, list[dict]] = {}
        T, N = workload.tasks, max(workload.support, workload.query)

        def hook(module, inputs, output):
            for family in FAMILIES.values():
                if family.layer_shapes is not None and type(module) in family.modules:
                    derived.setdefault(family.name, []).append(
                        family.layer_shapes(module, (T, *inputs[0].shape)))

        handles = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            model(torch.empty(N, *workload.input_shape, device="meta"))
        finally:
            for h in handles:
                h.remove()
        listed = WORKLOAD_OP_SHAPES[name]
        assert derived, f"{name}: no layer of its model belongs to a family"
        for family, shapes in derived.items():
            assert family in listed, f"{name}: WORKLOAD_OP_SHAPES lacks {family}, which its model runs"
        for family, entries in listed.items():
            if FAMILIES[family].layer_shapes is None:
                continue
            for entry in entries if isinstance(entries, list) else [entries]:
                shape = {k: v for k, v in entry.items() if k not in ("act", "kind")}
                assert shape in derived.get(family, []), f"{name} {family}: {entry} is no layer of the model"

"""The package's layers, checked by walking every import (statements and
``importlib.import_module("...")`` calls, at module level and inside functions).

Top to bottom: tools → l2l (learn2learn's API) → learners → engine → ops → backends →
kernels. ``fastmeta.testing`` (the test and benchmark oracle) sits just below the tools: it
may import the engine, ops and learners, and only the tools import it. Beside them, leaf
modules that import none of those layers: models, checkpoint, data (which uses checkpoint),
distributed. A module imports only from its own sub-package or from a lower layer, and
there is no import cycle between modules. fastmeta.l2l uses only the public face of what it
builds on (the packages, not their private modules), and only the tools and the package root
import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# fastmeta.<part> → rank. The package root (fastmeta/__init__.py, __main__.py) is the
# public face: it may import anything but the tools, and only the tools import it.
RANKS = {
    "kernels": 0,
    "models": 0,
    "checkpoint": 0,
    "backends": 1,
    "data": 1,
    "ops": 2,
    "engine": 3,
    "learners": 4,
    "l2l": 4.5,
    "distributed": 5,
    "testing": 5.75,  # above the package root (5.5): only the tools may import it
    "tools": 6,
}
ROOT_MODULES = {"fastmeta", "fastmeta.__main__"}
ROOT_RANK = 5.5


def package_modules() -> dict[str, Path]:
    """Module name → file, for fastmeta/ and kernels/ (installed as fastmeta.kernels)."""
    modules = {}
    for base, prefix in ((REPO / "fastmeta", "fastmeta"), (REPO / "kernels", "fastmeta.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The fastmeta modules ``name`` imports (a package import counts as its __init__)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    found = set()

    def resolve(module: str) -> str | None:
        while module and module not in known:
            module = module.rpartition(".")[0]
        return module or None

    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # "from pkg import sub" imports the submodule; "from pkg import name" the package
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            if target.startswith("fastmeta"):
                resolved = resolve(target)
                if resolved and resolved != name:
                    found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def part_of(module: str) -> str | None:
    if module in ROOT_MODULES:
        return None
    return module.split(".")[1]


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in import_graph()} - {None}
    assert parts <= set(RANKS), f"modules outside the layer table: {parts - set(RANKS)}"


def test_no_layer_imports_a_layer_above_it():
    bad = []
    for module, targets in import_graph().items():
        part = part_of(module)
        rank = ROOT_RANK if part is None else RANKS[part]
        for target in targets:
            other = part_of(target)
            if other == part:
                continue
            if module == "fastmeta.__main__" and target == "fastmeta.tools.cli":
                continue  # `python -m fastmeta` is the CLI
            other_rank = ROOT_RANK if other is None else RANKS[other]
            if other_rank >= rank:
                bad.append(f"{module} ({part or 'root'}) imports {target} ({other or 'root'})")
    assert not bad, "\n".join(sorted(bad))


# What fastmeta.l2l may import from below it: public packages and modules, never their insides.
L2L_MAY_IMPORT = {"fastmeta.learners", "fastmeta.engine", "fastmeta.data", "fastmeta.models"}


def l2l_import_problems(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        inside = part_of(module) == "l2l"
        for target in targets:
            if inside and part_of(target) != "l2l" and target not in L2L_MAY_IMPORT:
                bad.append(f"{module} imports {target}: l2l uses only {sorted(L2L_MAY_IMPORT)}")
            if not inside and part_of(target) == "l2l" and part_of(module) not in (None, "tools"):
                bad.append(f"{module} imports {target}: only the tools and the package root import l2l")
    return bad


def test_l2l_uses_only_public_packages_and_only_the_top_imports_it():
    bad = l2l_import_problems(import_graph())
    assert not bad, "\n".join(sorted(bad))


def test_the_l2l_check_catches_a_private_import_and_a_reverse_import():
    graph = {
        "fastmeta.l2l.nn": {"fastmeta.learners.adapted", "fastmeta.learners"},
        "fastmeta.distributed": {"fastmeta.l2l"},
        "fastmeta.tools.cli": {"fastmeta.l2l"},
    }
    bad = l2l_import_problems(graph)
    assert len(bad) == 2
    assert "fastmeta.learners.adapted" in bad[0] + bad[1] and "fastmeta.distributed" in bad[0] + bad[1]


def test_only_the_tools_import_the_test_oracle():
    """fastmeta.testing is test and benchmark code: the product never depends on it, except
    ``fastmeta bench`` (the tools)."""
    graph = import_graph()
    importers = {m for m, targets in graph.items() if any(part_of(t) == "testing" for t in targets)}
    outside = {m for m in importers if part_of(m) not in {"testing", "tools"}}
    assert not outside, f"the product imports fastmeta.testing: {sorted(outside)}"
    assert "fastmeta.testing.reference_loop" in graph
    assert any(part_of(m) == "tools" for m in importers), "fastmeta bench no longer uses the oracle"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def without_package_parents(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A module importing its own package's ``__init__`` (to reach a sibling) is how Python
    packages work, not a cycle of ours: those edges are dropped before the search."""
    return {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}


def test_no_import_cycles():
    cycle = find_cycle(without_package_parents(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"fastmeta.ops.a": {"fastmeta.engine.b"}, "fastmeta.engine.b": {"fastmeta.ops.a"}}
    assert set(find_cycle(graph)) == {"fastmeta.ops.a", "fastmeta.engine.b"}
    assert RANKS[part_of("fastmeta.engine.b")] > RANKS[part_of("fastmeta.ops.a")]


def test_nothing_points_outside_the_repository():
    """The repository stands alone: no path into a sibling folder of the checkout."""
    # Spelled in pieces, so that this file does not name them itself.
    SIBLING_MARKERS = ("../" + "shared", "BENCH" + "MARKS.md", "DES" + "IGN.md", "CONVEN" + "TIONS.md")
    hits = []
    for path in REPO.rglob("*"):
        if not path.is_file() or any(p in path.parts for p in (".git", ".venv", "__pycache__")) \
                or path.suffix not in {".py", ".md", ".toml", ".cpp", ".cu", ".h", ".cuh", ".sh", ".txt", ""}:
            continue
        if "egg-info" in str(path):
            continue
        text = path.read_text(errors="replace")
        for marker in SIBLING_MARKERS:
            if marker in text:
                hits.append(f"{path.relative_to(REPO)}: {marker}")
    assert not hits, "\n".join(sorted(set(hits)))


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/helpers.py (and conftest's fixtures, tests/ops/harness.py):
    a test module never imports another test module, so moving or editing one test never
    breaks another."""
    tests = REPO / "tests"
    test_modules = {p.stem for p in tests.rglob("test_*.py")}
    assert "test_layers" in test_modules
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.rpartition(".")[2] in test_modules or name.startswith("test_"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)

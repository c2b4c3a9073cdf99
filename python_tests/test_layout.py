"""The package's shape: subpackages by concept, imports one way, no import cycles.

The import graph is read from the source (every ``import`` statement, in functions too,
except under ``if TYPE_CHECKING:`` and in ``if __name__ == "__main__":`` script blocks),
so a cycle hidden behind a deferred import counts as a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lipschitz_ext

PACKAGE_DIR = Path(lipschitz_ext.__file__).resolve().parent

#: Subpackages from the bottom up: a module may import its own subpackage and any
#: subpackage on a lower rank, never one on a higher rank (equal ranks do not import each other).
LAYERS: dict[str, int] = {
    "data": 0, "storage": 0,
    "ops": 1,
    "constraints": 2,
    "nn": 3,
    "optim": 4,
    "certify": 5,
    "evaluation": 6,
    "training": 7,
    "experiments": 8,
    "bench": 9,
    "cli": 10,
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_block(test: ast.expr) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """``(edges, nested)``: module -> the package's modules it imports, and module -> the
    ``(line, imported module)`` of imports inside functions or classes."""
    files = sorted(p for p in root.rglob("*.py"))
    modules = {module_name(p, root, package): p for p in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    nested: dict[str, list[tuple[int, str]]] = {m: [] for m in modules}

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        is_pkg = path.name == "__init__.py"

        def visit(node: ast.AST, depth: int) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and (_is_type_checking(child.test) or _is_main_block(child.test)):
                    for sub in child.orelse:
                        visit_stmt(sub, depth)
                    continue
                visit_stmt(child, depth)

        def visit_stmt(child: ast.AST, depth: int) -> None:
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, mod, is_pkg)
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            for n in names:
                if n.split(".")[0] == package:
                    t = target(n)
                    if t is not None and t != mod and not mod.startswith(t + "."):
                        edges[mod].add(t)
            if names and depth > 0:
                nested[mod].append((child.lineno, names[-1] if isinstance(child, ast.ImportFrom) else names[0]))
            if not isinstance(child, (ast.Import, ast.ImportFrom)):
                visit(child, inner)

        visit(tree, 0)
    return edges, nested


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def _subpackage(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in edges.items():
        sa = _subpackage(a)
        for b in targets:
            sb = _subpackage(b)
            if sa is None or sb is None or sa == sb or sb.startswith("_"):
                continue
            if sa not in LAYERS or sb not in LAYERS or LAYERS[sb] >= LAYERS[sa]:
                bad.append(f"{a} imports {b}")
    return sorted(bad)


@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE_DIR, "lipschitz_ext")


def test_no_import_cycles(graph):
    edges, _ = graph
    assert find_cycles(edges) == []


def test_imports_go_one_way(graph):
    edges, _ = graph
    assert layer_violations(edges) == []


def test_no_deferred_imports_of_our_own_modules(graph):
    """Imports inside functions only for optional or heavy dependencies, each with a comment."""
    _, nested = graph
    ours = [f"{m}:{line} {name}" for m, items in nested.items() for line, name in items
            if name.startswith("lipschitz_ext")]
    assert ours == []
    for mod, items in nested.items():
        path = PACKAGE_DIR.joinpath(*mod.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        lines = path.read_text(encoding="utf-8").splitlines()
        for line, name in items:
            assert "#" in lines[line - 1], f"{mod}:{line}: deferred import of {name} without a comment saying why"


def test_only_subpackages_at_the_top():
    tops = sorted(p.name for p in PACKAGE_DIR.glob("*.py") if p.name != "__init__.py")
    assert tops == []
    subs = sorted(p.name for p in PACKAGE_DIR.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert set(subs) == set(LAYERS)


def test_the_checks_see_a_planted_cycle(tmp_path):
    pkg = tmp_path / "planted"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from ..high import b  # deferred, still a cycle\n")
    (pkg / "high" / "b.py").write_text("from ..low import a\n")
    edges, nested = import_graph(pkg, "planted")
    assert find_cycles(edges) == [["planted.high.b", "planted.low.a"]]
    assert nested["planted.low.a"] == [(2, "planted.high")]
    # guarded imports are not part of the graph
    (pkg / "low" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..high import b\n")
    edges, _ = import_graph(pkg, "planted")
    assert find_cycles(edges) == []


def test_the_layer_check_sees_an_upward_import():
    edges = {"lipschitz_ext.ops.x": {"lipschitz_ext.training.loop"}, "lipschitz_ext.training.loop": set()}
    assert layer_violations(edges) == ["lipschitz_ext.ops.x imports lipschitz_ext.training.loop"]


def test_no_module_is_too_long_for_one_concept():
    """~400 lines: past that a module must be one concept (the allow-list says which)."""
    one_concept = {
        "optim/muon.py",            # the Muon optimizer
        "training/loop.py",         # the training loop, read top to bottom
        "data/text.py",             # text corpora, shards, tokenizers
        "ops/spectral_cap.py",      # the wrappers of the spectral-cap kernel family
        "bench/suites/bench_constraints.py",  # one suite
    }
    long = []
    for p in PACKAGE_DIR.rglob("*.py"):
        rel = p.relative_to(PACKAGE_DIR).as_posix()
        n = len(p.read_text(encoding="utf-8").splitlines())
        if n > 420 and rel not in one_concept:
            long.append(f"{rel}: {n} lines")
    assert long == []


def test_every_test_file_the_docs_name_exists():
    """Docs, code comments and scripts that point a reader at ``python_tests/<file>.py`` point at
    a file that is there (tests get merged and renamed; the references must follow)."""
    root = PACKAGE_DIR.parent
    sources = [*root.glob("docs/*.md"), root / "README.md", *root.glob("bench/*.sh"),
               *PACKAGE_DIR.rglob("*.py"), *root.glob("csrc/**/*.h"), *root.glob("csrc/**/*.cpp"),
               *root.glob("csrc/**/*.cu")]
    named = {m for f in sources if f.is_file() for m in re.findall(r"python_tests/[a-z_0-9]+\.py", f.read_text())}
    assert named, "no references found: the pattern or the paths are wrong"
    missing = sorted(n for n in named if not (root / n).is_file())
    assert not missing, missing

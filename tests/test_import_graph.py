"""Dependencies point one way (ARCHITECTURE.md "Layout"): no import cycle, no import of a higher layer.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` of a ``dist_seg``
module, at module level and inside functions alike (a lazy import is still a dependency). A failure names
the offending edge as ``file:line``. A new top-level module must be placed in :data:`LAYERS` first.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "dist_seg"

# Lowest first. A module may import its own layer and the layers below, never one above. Names are module
# names or packages (a package covers its submodules); the most specific entry wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("dist_seg", "dist_seg.distributed", "dist_seg.maskdistill.config", "dist_seg.config",
                    "dist_seg.runtime", "dist_seg.checkpoints")),
    ("stages", ("dist_seg.data", "dist_seg.backbones", "dist_seg.features", "dist_seg.knn", "dist_seg.knn_table",
                "dist_seg.heads", "dist_seg.losses", "dist_seg.maskdistill", "dist_seg.methods", "dist_seg.eval",
                "dist_seg.tracking", "dist_seg.ds_engine")),
    ("trainer", ("dist_seg.trainer",)),
    ("commands", ("dist_seg.tune", "dist_seg.sweeps", "dist_seg.predict", "dist_seg.serving", "dist_seg.demo",
                  "dist_seg.cli", "dist_seg.pipeline", "dist_seg.eval_command")),
]

# Edges the layers allow but the design does not (source, target, why). Each entry covers submodules.
FORBIDDEN: list[tuple[str, str, str]] = [
    *[("dist_seg.distributed", t, "distributed.py imports nothing of dist_seg")
      for t in ("dist_seg.config", "dist_seg.runtime", "dist_seg.maskdistill")],
    ("dist_seg.maskdistill.config", "dist_seg.config", "maskdistill/config.py is a pure-dataclass module"),
    ("dist_seg.config", "dist_seg.runtime", "runtime builds on config, not the reverse"),
    ("dist_seg.config", "dist_seg.distributed", "configs are plain data"),
    # losses and heads are pure: tensors in, tensors out (losses: no collectives either)
    *[("dist_seg.losses", t, "losses are pure functions of tensors")
      for t in ("dist_seg.distributed", "dist_seg.runtime", "dist_seg.data", "dist_seg.backbones",
                "dist_seg.features", "dist_seg.knn", "dist_seg.knn_table", "dist_seg.heads", "dist_seg.methods",
                "dist_seg.eval", "dist_seg.tracking", "dist_seg.maskdistill", "dist_seg.ds_engine")],
    *[("dist_seg.heads", t, "heads are pure modules")
      for t in ("dist_seg.distributed", "dist_seg.runtime", "dist_seg.data", "dist_seg.backbones",
                "dist_seg.features", "dist_seg.knn", "dist_seg.knn_table", "dist_seg.losses", "dist_seg.methods",
                "dist_seg.eval", "dist_seg.tracking", "dist_seg.maskdistill", "dist_seg.ds_engine")],
    # the exact-KNN algorithm is pure (tensors in, tensors out); the training set's table sits above it
    *[("dist_seg.knn", t, "knn.py is the pure algorithm; files, descriptors and the CLI live in knn_table.py")
      for t in ("dist_seg.config", "dist_seg.runtime", "dist_seg.data", "dist_seg.backbones", "dist_seg.features",
                "dist_seg.knn_table", "dist_seg.methods", "dist_seg.eval", "dist_seg.tracking")],
    # data is the lowest stage: it knows no model, method or evaluation
    *[("dist_seg.data", t, "data/ knows no model, method or evaluation")
      for t in ("dist_seg.backbones", "dist_seg.features", "dist_seg.knn", "dist_seg.knn_table", "dist_seg.heads",
                "dist_seg.losses", "dist_seg.methods", "dist_seg.eval", "dist_seg.tracking", "dist_seg.maskdistill")],
    *[("dist_seg.backbones", t, "backbones load models; they read no dataset and train nothing")
      for t in ("dist_seg.features", "dist_seg.knn_table", "dist_seg.methods", "dist_seg.eval", "dist_seg.tracking")],
    *[("dist_seg.features", t, "the feature cache is read by the table, methods and eval, not the reverse")
      for t in ("dist_seg.knn_table", "dist_seg.methods", "dist_seg.eval", "dist_seg.tracking")],
    *[("dist_seg.methods", t, "methods are known to the trainer and eval through their interface only")
      for t in ("dist_seg.eval", "dist_seg.tracking", "dist_seg.knn_table", "dist_seg.ds_engine")],
    ("dist_seg.eval", "dist_seg.tracking", "evaluation returns numbers; the trainer tracks them"),
    ("dist_seg.eval", "dist_seg.knn_table", "evaluation needs no KNN table"),
    *[("dist_seg.tracking", t, "tracking is MLflow only")
      for t in ("dist_seg.data", "dist_seg.backbones", "dist_seg.features", "dist_seg.knn", "dist_seg.knn_table",
                "dist_seg.heads", "dist_seg.losses", "dist_seg.methods", "dist_seg.eval", "dist_seg.maskdistill")],
    # the trainer is imported by the commands above it, never by a stage command's own module in reverse
    ("dist_seg.trainer", "dist_seg.cli", "the trainer is below every command module"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The dist_seg module that ``name`` (a module, or ``module.attribute``) lives in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of a dist_seg module anywhere in a dist_seg file."""
    edges = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                # `from dist_seg.eval import plots` imports the submodule dist_seg.eval.plots
                targets = [f"{origin}.{alias.name}" for alias in node.names]
            for target in targets:
                if not target.startswith("dist_seg"):
                    continue
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != module:
                    edges.append((module, resolved, node.lineno))
    return sorted(set(edges))


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for rank, (_, names) in enumerate(LAYERS):
        for name in names:
            # "dist_seg" itself names the package's __init__ only, not everything below it
            if (module == name if name == "dist_seg" else _covers(name, module)) and len(name) > best_len:
                best, best_len = rank, len(name)
    return best


def _where(module: str, line: int, modules: dict[str, Path]) -> str:
    return f"{modules[module].relative_to(PACKAGE_DIR.parent)}:{line}"


def find_violations(modules: dict[str, Path]) -> list[str]:
    """Every upward or forbidden edge, and every module no layer places, as readable lines."""
    problems = []
    for module in modules:
        if layer_of(module) is None:
            problems.append(f"{_where(module, 1, modules)}: module {module} is in no layer of "
                            f"tests/test_import_graph.py LAYERS (place it as ARCHITECTURE.md's layout does)")
    for src, dst, line in import_edges(modules):
        a, b = layer_of(src), layer_of(dst)
        if a is not None and b is not None and b > a:
            problems.append(f"{_where(src, line, modules)}: {src} ({LAYERS[a][0]}) imports {dst} "
                            f"({LAYERS[b][0]}), a higher layer")
        for s, d, why in FORBIDDEN:
            if _covers(s, src) and _covers(d, dst) and not _covers(s, dst):
                problems.append(f"{_where(src, line, modules)}: {src} imports {dst}: {why}")
    return problems


def find_cycles(modules: dict[str, Path]) -> list[str]:
    """One line per import cycle (each as a chain of edges with file:line)."""
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for src, dst, line in import_edges(modules):
        graph[src].setdefault(dst, line)
    # Tarjan's strongly connected components; a component of 2+ modules is a cycle.
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    lines = []
    for comp in comps:
        inside = set(comp)
        chain = [f"{_where(s, ln, modules)} {s} -> {d}" for s in comp for d, ln in sorted(graph[s].items())
                 if d in inside]
        lines.append("cycle among " + ", ".join(comp) + ":\n    " + "\n    ".join(chain))
    return lines


def test_the_graph_is_read_from_every_kind_of_import():
    modules = _modules()
    edges = {(s, d) for s, d, _ in import_edges(modules)}
    assert len(modules) > 40, f"found only {len(modules)} modules under {PACKAGE_DIR}"
    # module level, function level, `from package import submodule`, relative imports are all seen
    assert ("dist_seg.methods.stego", "dist_seg.losses.stego") in edges
    assert ("dist_seg.trainer", "dist_seg.tracking") in edges, "function-level imports must count"
    assert ("dist_seg.eval.evaluate", "dist_seg.eval.plots") in edges, "`from dist_seg.eval import plots`"


def test_no_import_cycle():
    cycles = find_cycles(_modules())
    assert not cycles, "import cycles in dist_seg:\n" + "\n".join(cycles)


def test_no_upward_or_forbidden_import():
    problems = find_violations(_modules())
    assert not problems, ("imports against ARCHITECTURE.md's layout (a lower module imports a higher one):\n"
                          + "\n".join(problems))


@pytest.mark.parametrize("src,dst,expected", [
    ("dist_seg.knn", "dist_seg.trainer", "higher layer"),
    ("dist_seg.losses.stego", "dist_seg.distributed", "pure functions"),
    ("dist_seg.maskdistill.mining", "dist_seg.pipeline", "higher layer"),
])
def test_a_bad_edge_is_reported_with_its_place(tmp_path, monkeypatch, src, dst, expected):
    """The checker itself can fail: a planted bad import is reported as file:line."""
    pkg = tmp_path / "dist_seg"
    for name in {src, dst, "dist_seg"}:
        parts = name.split(".")
        for i in range(1, len(parts)):
            (pkg.parent.joinpath(*parts[:i])).mkdir(parents=True, exist_ok=True)
            init = pkg.parent.joinpath(*parts[:i], "__init__.py")
            init.touch()
        if len(parts) > 1:
            pkg.parent.joinpath(*parts).with_suffix(".py").touch()
    pkg.parent.joinpath(*src.split(".")).with_suffix(".py").write_text(f"def f():\n    import {dst}\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGE_DIR", pkg)
    problems = find_violations(_modules())
    where = str(Path(*src.split(".")).with_suffix(".py")) + ":2"
    assert any(where in p and expected in p for p in problems), problems

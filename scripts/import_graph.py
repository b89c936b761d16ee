"""The workbench package's import graph, from the source (``ast``; nothing is imported).

Prints, and with ``--check`` fails (exit 1) on any of:

- **cross-analysis imports**: a module of ``workbench/analyses/<a>/`` importing one of
  ``workbench/analyses/<b>/`` (an analysis reaches shared machinery through
  ``workbench.forward`` and the layers below it, never through another analysis);
- **cycles**: strongly connected groups of two or more modules;
- **imports up a layer**: a module importing one of a higher layer (:data:`LAYERS`).

An edge is an import executed at run time: at module level or inside a function (a lazy
import is still a dependency). Imports under ``if TYPE_CHECKING:`` are left out (they never
run), and so is an import of a package enclosing the importer (``workbench.analyses.x.compute``
importing ``workbench.analyses.x``): Python imports a module's enclosing packages before the
module itself, so that edge exists for every module and says nothing about the design.

Usage: ``python scripts/import_graph.py [--check] [--root workbench]``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Bottom to top; a module may import its own layer and those below it. Keys are the first
# name under ``workbench`` (a flat module, or a subpackage).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "types", "home", "hooks", "params", "progress", "provenance", "heads")),
    ("base: numerics", ("stats", "metrics", "figures")),
    ("data", ("models", "tasks", "result", "store", "export", "groups", "attention")),
    ("forward", ("forward",)),
    ("post-processing", ("edges", "circuits")),
    ("analyses", ("analyses",)),
    ("registry", ("registry", "atlas")),
    ("orchestration", ("runner", "spec", "jobs", "cli")),
)


@dataclass
class Graph:
    modules: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)

    def targets(self, module: str) -> set[str]:
        return self.edges.get(module, set())


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: ``if TYPE_CHECKING:`` bodies skipped."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(graph: Graph, importer: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The workbench modules ``node`` imports (``from pkg import submodule`` is the submodule)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = importer.split(".")
            if graph.modules[importer].name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        names = []
        for alias in node.names:
            full = f"{package}.{alias.name}"
            names.append(full if full in graph.modules else package)
    out = []
    for name in names:
        while name not in graph.modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in graph.modules:
            out.append(name)
    return out


def build(root: Path) -> Graph:
    graph = Graph({_module_name(p, root): p for p in sorted(root.rglob("*.py"))})
    for module, path in graph.modules.items():
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            for target in _resolve(graph, module, node):
                enclosing = module.startswith(target + ".")
                if target != module and not enclosing:
                    targets.add(target)
        graph.edges[module] = targets
    return graph


def analysis_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "analyses" else None


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the root package
    for i, (_, keys) in enumerate(LAYERS):
        if parts[1] in keys:
            return i
    return None


def cross_analysis(graph: Graph) -> list[tuple[str, str]]:
    return sorted(
        (a, b)
        for a in graph.modules
        for b in graph.targets(a)
        if analysis_of(a) and analysis_of(b) and analysis_of(a) != analysis_of(b)
    )


def upward(graph: Graph) -> list[tuple[str, str]]:
    out = []
    for a in graph.modules:
        la = layer_of(a)
        for b in graph.targets(a):
            lb = layer_of(b)
            if la is not None and lb is not None and lb > la:
                out.append((a, b))
    return sorted(out)


def unlayered(graph: Graph) -> list[str]:
    return sorted(m for m in graph.modules if m.count(".") and layer_of(m) is None)


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected groups of >= 2 modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in graph.modules:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.targets(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.targets(w)))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    group.append(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return sorted(groups)


def report(graph: Graph) -> dict[str, list]:
    return {
        "cross-analysis imports": cross_analysis(graph),
        "cycles": cycles(graph),
        "imports up a layer": upward(graph),
        "modules in no layer": unlayered(graph),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "workbench"))
    ap.add_argument("--check", action="store_true", help="exit 1 if anything is found")
    args = ap.parse_args(argv)
    graph = build(Path(args.root))
    n_edges = sum(len(t) for t in graph.edges.values())
    flat = sum(1 for m in graph.modules if m.count(".") == 1 and graph.modules[m].stem == m[10:])
    print(
        f"{len(graph.modules)} modules, {n_edges} import edges, {flat} flat modules in workbench/"
    )
    found = report(graph)
    for title, items in found.items():
        print(f"{title}: {len(items)}")
        for item in items:
            print("   ", " -> ".join(item) if isinstance(item, tuple) else item)
    return 1 if args.check and any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The package's layering, read from the source: no analysis imports another, no import cycle,
no import up a layer (``scripts/import_graph.py``, which prints the same report)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _graph_module():
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts/import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


IG = _graph_module()


@pytest.fixture(scope="module")
def graph():
    return IG.build(ROOT / "workbench")


def test_no_analysis_imports_another(graph):
    assert IG.cross_analysis(graph) == []


def test_no_import_cycle(graph):
    assert IG.cycles(graph) == []


def test_no_import_points_up_a_layer_and_every_module_has_a_layer(graph):
    assert IG.upward(graph) == []
    assert IG.unlayered(graph) == []


def test_generic_modules_never_import_the_registry(graph):
    generic = ["workbench.result", "workbench.circuits.agreement", "workbench.forward.selfcheck"]
    for module in generic:
        assert "workbench.registry" not in graph.targets(module), module


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "workbench"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checker_finds_what_it_looks_for(tmp_path):
    """The checks can fail: a planted cross-analysis import, a lazy cycle, an upward import."""
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "types.py": "",
            "forward/__init__.py": "",
            "forward/resume.py": "def f():\n    from workbench.forward import selfcheck\n",
            "forward/selfcheck.py": "from workbench.forward.resume import f\n",
            "analyses/__init__.py": "",
            "analyses/a/__init__.py": "def load():\n    from workbench.analyses.a import compute\n",
            "analyses/a/compute.py": "from workbench.analyses.a import load\n"
            "from workbench.analyses.b.compute import g\n",
            "analyses/b/__init__.py": "",
            "analyses/b/compute.py": "def g():\n    pass\n",
            "types_user.py": "",
            "models/__init__.py": "from workbench.forward import resume\n",
            "runner.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from workbench.cli import x
                """,
            "cli.py": "from workbench import runner\n",
        },
    )
    graph = IG.build(root)
    assert IG.cross_analysis(graph) == [
        ("workbench.analyses.a.compute", "workbench.analyses.b.compute")
    ]
    # the lazy pair in forward/ is a cycle; an analysis package and its own compute module
    # (child importing its enclosing package) is not
    assert IG.cycles(graph) == [["workbench.forward.resume", "workbench.forward.selfcheck"]]
    assert IG.upward(graph) == [("workbench.models", "workbench.forward.resume")]
    assert IG.unlayered(graph) == ["workbench.types_user"]
    assert "workbench.cli" not in graph.targets("workbench.runner")  # TYPE_CHECKING only

"""Generate the docs site's code-derived pages at build time (mkdocs-gen-files runs this).

- ``reference/``: one page per module of the ``workbench`` package (``::: workbench.x.y``,
  rendered from the docstrings by mkdocstrings), found by walking the package on disk, and its
  navigation (``reference/SUMMARY.md``, read by mkdocs-literate-nav). Moving, adding or removing
  a module changes the pages with no edit here.
- ``tasks.md``: the parameters of every registered task, where the page has the
  ``<!-- task-options -->`` marker.
- ``analyses/<name>.md``: the hand-written page of each registered analysis, with its registry
  entry and its options (the fields of its parameter dataclass with their ``metadata["help"]``)
  inserted where the page has the ``<!-- options -->`` marker; and ``analyses/SUMMARY.md``, the
  analyses in registry order.

Everything is read with ``ast`` from the source files: nothing is imported, so torch is not
needed to build the docs.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "workbench"
MARKER = "<!-- options -->"
TASK_MARKER = "<!-- task-options -->"
NOT_LITERAL = (ValueError, TypeError, SyntaxError)


# -- API reference --------------------------------------------------------------------------


def api_pages() -> None:
    nav = mkdocs_gen_files.Nav()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = tuple(rel.parts)
        if "__pycache__" in parts or parts[-1] == "__main__":
            continue
        if not all(
            (ROOT / Path(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))
        ):
            continue  # not inside a regular package (e.g. a folder still being created)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            doc = Path("reference", *parts, "index.md")
        else:
            doc = Path("reference", *parts).with_suffix(".md")
        nav[parts] = doc.relative_to("reference").as_posix()
        with mkdocs_gen_files.open(doc.as_posix(), "w") as f:
            f.write(f"# `{'.'.join(parts)}`\n\n::: {'.'.join(parts)}\n")
        mkdocs_gen_files.set_edit_path(doc.as_posix(), path.relative_to(ROOT).as_posix())
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
        f.writelines(nav.build_literate_nav())


# -- analyses: registry entries and options ---------------------------------------------------


def registered_analyses() -> list[str]:
    """The names in ``workbench/registry.py``'s ``_PACKAGES`` tuple, in registry order."""
    tree = ast.parse((PACKAGE / "registry.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_PACKAGES" for t in node.targets
        ):
            assert isinstance(node.value, ast.Tuple)
            return [ast.unparse(e).split(".")[-1] for e in node.value.elts]
    raise RuntimeError("workbench/registry.py has no _PACKAGES tuple")


def _constants(tree: ast.Module) -> dict[str, Any]:
    """Module-level names bound to literals (e.g. ``DETECTORS = (...)``)."""
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name):
            with contextlib.suppress(*NOT_LITERAL):
                found[target.id] = ast.literal_eval(value)
    return found


def _value(node: ast.expr | None, constants: dict[str, Any]) -> Any:
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except NOT_LITERAL:
        return _Code(ast.unparse(node))


class _Code(str):
    """An expression that is not a literal, shown as written."""


def _toml(value: Any) -> str:
    """A default as a spec (TOML) would write it."""
    if isinstance(value, _Code):
        return f"`{value}`"
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, tuple | list):
        inner = ", ".join(_toml(v).strip("`") for v in value)
        return f"`[{inner}]`"
    return f"`{value}`"


def _type(annotation: ast.expr) -> str:
    if (
        isinstance(annotation, ast.Subscript)
        and ast.unparse(annotation.value).split(".")[-1] == "Literal"
    ):
        elts = (
            annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        )
        return "one of " + ", ".join(f"`{ast.literal_eval(e)}`" for e in elts)
    return f"`{ast.unparse(annotation)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _options(cls: ast.ClassDef, constants: dict[str, Any]) -> list[str]:
    rows = ["| option | type | default | what |", "| --- | --- | --- | --- |"]
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        default: Any = None
        help_text = ""
        value = node.value
        if (
            isinstance(value, ast.Call)
            and isinstance(value.func, ast.Name)
            and value.func.id == "field"
        ):
            for kw in value.keywords:
                if kw.arg == "default":
                    default = _value(kw.value, constants)
                elif kw.arg == "default_factory":
                    default = _Code(f"{ast.unparse(kw.value)}()")
                elif kw.arg == "metadata" and isinstance(kw.value, ast.Dict):
                    for k, v in zip(kw.value.keys, kw.value.values, strict=True):
                        if isinstance(k, ast.Constant) and k.value == "help":
                            got = _value(v, constants)
                            help_text = got if isinstance(got, str) else ""
        else:
            default = _value(value, constants)
        rows.append(
            f"| `{node.target.id}` | {_cell(_type(node.annotation))} | {_cell(_toml(default))} "
            f"| {_cell(help_text)} |"
        )
    return rows


def _entry(tree: ast.Module, name: str = "ENTRY") -> dict[str, ast.expr]:
    """The keyword arguments of the call bound to ``name`` (``ENTRY = Analysis(...)``)."""
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.Call)
        ):
            return {kw.arg: kw.value for kw in node.value.keywords if kw.arg}
    raise RuntimeError(f"no {name} = ...(...)")


def _params_class(tree: ast.Module, entry: dict[str, ast.expr]) -> tuple[str, ast.ClassDef | None]:
    name = ast.unparse(entry["params_cls"])
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    return name, cls


def _roles(node: ast.expr | None) -> list[str]:
    out = []
    for call in ast.walk(node) if node is not None else ():
        if isinstance(call, ast.Call) and ast.unparse(call.func).endswith("RoleRule"):
            args = []
            for a in call.args[:4]:
                try:
                    args.append(ast.literal_eval(a))
                except NOT_LITERAL:
                    args.append(ast.unparse(a))
            if len(args) == 4:
                label, metric, op, threshold = args
                out.append(f"{label} (`{metric} {op} {threshold}`)")
    return out


def analysis_section(name: str) -> str:
    """The generated part of ``docs/analyses/<name>.md``: registry entry and options."""
    source = PACKAGE / "analyses" / name / "__init__.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    constants = _constants(tree)
    entry = _entry(tree)

    def literal(key: str, default: Any = "") -> Any:
        got = _value(entry.get(key), constants) if key in entry else default
        return default if isinstance(got, _Code) else got

    lines = ["| entry | value |", "| --- | --- |"]
    lines.append(f"| name | `{name}` |")
    lines.append(f"| what | {_cell(literal('description'))} |")
    lines.append(f"| default task | `{literal('default_task')}` |")
    tasks = literal("tasks", ())
    if tasks:
        lines.append(f"| tasks (the app's Run page) | {', '.join(f'`{t}`' for t in tasks)} |")
    if literal("reference"):
        lines.append(f"| reference | {_cell(literal('reference'))} |")
    checks = literal("checks", ())
    if checks:
        lines.append(f"| self-checks | {', '.join(f'`{c}`' for c in checks)} |")
    roles = _roles(entry.get("roles"))
    if roles:
        lines.append(f"| atlas roles | {_cell('; '.join(roles))} |")
    lines.append(f"| version | `{literal('version', '1')}` |")

    params_name, cls = _params_class(tree, entry)
    out = ["## Registry entry", "", *lines, "", "## Options", ""]
    if cls is None:
        out.append(f"Parameters: `{params_name}` (see `workbench analyses`).")
    else:
        doc = ast.get_docstring(cls)
        if doc:
            out += [f"`{params_name}`: {_cell(doc)} Set them in a spec's `params = {{...}}`.", ""]
        out += _options(cls, constants)
    out.append("")
    out.append(
        f"*Generated from `workbench/analyses/{name}/__init__.py` when the site is built; "
        "`workbench analyses` prints the same.*"
    )
    return "\n".join(out) + "\n"


# -- tasks: their parameters ----------------------------------------------------------------


def registered_tasks() -> list[str]:
    """The task modules in ``workbench/tasks/__init__.py``'s ``TASKS`` (``<module>.SPEC``)."""
    tree = ast.parse((PACKAGE / "tasks" / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "TASKS" and node.value is not None:
            return [
                n.value.id
                for n in ast.walk(node.value)
                if isinstance(n, ast.Attribute)
                and n.attr == "SPEC"
                and isinstance(n.value, ast.Name)
            ]
    raise RuntimeError("workbench/tasks/__init__.py has no TASKS")


def task_section() -> str:
    out = []
    for module in registered_tasks():
        tree = ast.parse((PACKAGE / "tasks" / f"{module}.py").read_text(encoding="utf-8"))
        constants = _constants(tree)
        spec = _entry(tree, "SPEC")
        name = _value(spec.get("name"), constants)
        description = _value(spec.get("description"), constants)
        _, cls = _params_class(tree, spec)
        out += [f"### `{name}`", "", _cell(str(description)), ""]
        if cls is not None:
            out += [*_options(cls, constants), ""]
    out.append(
        "*Generated from `workbench/tasks/` when the site is built; `workbench tasks` prints "
        "the same.*"
    )
    return "\n".join(out) + "\n"


def task_page() -> None:
    src = ROOT / "docs" / "tasks.md"
    text = src.read_text(encoding="utf-8")
    if TASK_MARKER in text:
        with mkdocs_gen_files.open("tasks.md", "w") as f:
            f.write(text.replace(TASK_MARKER, task_section()))
        mkdocs_gen_files.set_edit_path("tasks.md", "docs/tasks.md")


def analysis_pages() -> None:
    names = registered_analyses()
    for name in names:
        page = f"analyses/{name}.md"
        src = ROOT / "docs" / page
        if not src.exists():
            raise RuntimeError(f"registered analysis {name!r} has no page docs/{page}")
        text = src.read_text(encoding="utf-8")
        section = analysis_section(name)
        text = text.replace(MARKER, section) if MARKER in text else f"{text}\n{section}"
        with mkdocs_gen_files.open(page, "w") as f:
            f.write(text)
        mkdocs_gen_files.set_edit_path(page, f"docs/{page}")
    with mkdocs_gen_files.open("analyses/SUMMARY.md", "w") as f:
        f.write("* [Overview](index.md)\n")
        f.writelines(f"* [{name}]({name}.md)\n" for name in names)


api_pages()
analysis_pages()
task_page()

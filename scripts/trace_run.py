"""Print the call trace of one spec part through the engine: computed, then served from the store.

Usage: ``python scripts/trace_run.py [--analysis head_detectors] [--model tiny-llama]``

Records every call into the orchestration layer (spec, runner, registry entry, params, tasks,
store, result, self-checks, after-store hooks) and the analysis function itself, not what those
call inside an analysis or library, with a fresh ``$WORKBENCH_HOME`` so the first run computes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

LAYER = (
    "workbench.spec",
    "workbench.runner",
    "workbench.registry",
    "workbench.types",
    "workbench.store.store",
    "workbench.result",
    "workbench.circuits.agreement",
)
"""The orchestration layer: their public functions are shown, and what they call."""
LEAVES = (
    "workbench.tasks",
    "workbench.models.loading",
    "workbench.forward.selfcheck",
    "workbench.params",
)
"""Shown where entered from the layer, but not inside (the analysis functions too)."""


def trace(fn) -> list[str]:
    """Run ``fn`` under a profiler; one indented line per call of a public function of the
    orchestration layer (``LAYER``), and per entry into a leaf (``LEAVES``, an analysis's
    ``compute`` module) without what it calls. Repeated calls in a row are one line (``xN``)."""
    lines: list[str] = []
    stack: list[str | None] = []  # per open frame: "shown", "leaf", "barrier" or None

    def profile(frame, event, arg) -> None:
        if event == "return":
            if stack:
                stack.pop()
            return
        if event != "call":
            return
        if "leaf" in stack or "barrier" in stack:
            stack.append(None)
            return
        mod, name = frame.f_globals.get("__name__", ""), frame.f_code.co_qualname
        private = any(p.startswith(("_", "<")) for p in name.split("."))
        leaf = mod.startswith(LEAVES) or (
            mod.startswith("workbench.analyses.") and mod.endswith(".compute")
        )
        if mod == "__main__":
            stack.append(None)
            return
        if not (leaf or mod.startswith(LAYER)):
            stack.append("barrier")  # library code, or a module outside the layer
            return
        if private or (name[:1].isupper() and "." not in name):
            stack.append(None)  # a private helper, lambda or class body: transparent
            return
        depth = sum(1 for s in stack if s in ("shown", "leaf"))
        line = f"{'  ' * depth}{mod}.{name}"
        if lines and lines[-1].split("  x")[0] == line:
            n = int(lines[-1].split("  x")[1]) + 1 if "  x" in lines[-1] else 2
            lines[-1] = f"{line}  x{n}"
        else:
            lines.append(line)
        stack.append("leaf" if leaf else "shown")

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis", default="head_detectors")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--task", default='{ name = "induction", seq_len = 8, n_prompts = 4 }')
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="workbench-trace-"))
    os.environ["WORKBENCH_HOME"] = str(home)
    spec = home / "spec.toml"
    spec.write_text(
        textwrap.dedent(f"""
        title = "trace"
        [defaults]
        models = ["{args.model}"]
        [[analysis]]
        name = "{args.analysis}"
        tasks = [{args.task}]
        """)
    )
    import workbench.circuits.agreement
    import workbench.models.loading
    import workbench.tasks  # noqa: F401  (imported before tracing: module bodies are not calls)
    from workbench.spec import load_spec, run_spec
    from workbench.store import ResultStore

    store = ResultStore()
    for label in ("computed", "stored"):
        outcome: list = []

        def one(outcome: list = outcome) -> None:
            outcome.extend(run_spec(load_spec(spec), store=store, progress=False, read=True))

        lines = trace(one)
        print(f"## {label}: {outcome[0].status} run {outcome[0].run_id}")
        print("\n".join(lines))
        print()


if __name__ == "__main__":
    main()

"""The analyses, one package each, every package the same shape.

``<name>/__init__.py`` (torch-free): the parameter dataclass and the registry entry ``ENTRY``;
``compute.py``: the pure function ``(model, prompts, params, **inputs) -> AnalysisOutput``;
``reference.py``: its slow, obvious reference where it has a fast path; ``figures.py``: its own
plots, if any. ``analyses/*.toml`` at the top of the repository are the runnable specs of what
these packages implement. Register a new package with one line in ``workbench/registry.py``.
"""

"""A Griffe extension for the docs build: Sphinx cross-reference roles in docstrings as code.

The workbench's docstrings use Sphinx roles (``:func:`run_part```, ``:class:`~x.y.Result```),
which Markdown would show as written. This rewrites each role to a code span of its target
(``~`` keeps the last component, as Sphinx does) when Griffe loads the object; the source files
are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc|const|ref):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def unrole(text: str) -> str:
    return ROLE.sub(_code, text)


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = unrole(obj.docstring.value)

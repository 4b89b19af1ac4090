"""A griffe extension for the API reference (mkdocs.yml loads it): fastprof's docstrings use a few
reStructuredText habits that Markdown would show verbatim.

* Sphinx roles become code spans: ``:class:`~fastprof.LoopMonitor``` -> ```LoopMonitor```,
  ``:func:`fastprof.Depends``` -> ```fastprof.Depends```.
* A literal-block marker ``Usage::`` ending a line becomes ``Usage:`` (the indented block after it
  is already a Markdown code block).

Only the rendered text changes; the docstrings in the package stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(?P<tilde>~?)(?P<target>[^`]+)`")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _code_span(role: re.Match[str]) -> str:
    target = role["target"]
    return f"`{target.rsplit('.', 1)[-1] if role['tilde'] else target}`"


def markdown(text: str) -> str:
    """``text`` with the reStructuredText habits above turned into Markdown."""
    return _LITERAL_MARKER.sub(":", _ROLE.sub(_code_span, text))


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)

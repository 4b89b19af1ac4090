"""The documentation: the site builds with ``mkdocs build --strict``, and every Python snippet in
``docs/*.md`` and ``README.md`` runs.

A snippet is a fenced block whose language is ``python`` or ``py``; each runs in a fresh module
namespace, after the code of an optional ``<!-- setup: ... -->`` HTML comment right before it and
before that of an optional ``<!-- then: ... -->`` comment right after it (docs/contributing.md,
"Code snippets are tests"). No snippet can be skipped. Tracebacks point at the Markdown lines.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.util._once import Once

from fastprof import _internal_errors

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = frozenset({"python", "py"})
COMMENT_CLOSE = "-->"
#: ``FASTPROF_SECRET`` for the snippets (docs/contributing.md says so).
SECRET = "docs-snippets-secret-0123456789abcdef"
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
_COMMENT_OPEN = re.compile(r"^(?P<indent>\s*)<!-- (?P<kind>setup|then):\s*$")


@dataclass(frozen=True)
class Code:
    text: str
    line: int
    """1-based line of its first line in the Markdown file."""


@dataclass(frozen=True)
class Snippet:
    path: Path
    code: Code
    setup: Code | None = None
    """Runs before the snippet: a ``<!-- setup: ... -->`` comment right before it."""
    then: Code | None = None
    """Runs after it, in its namespace: a ``<!-- then: ... -->`` comment right after it."""

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.code.line}"


def find_snippets(path: Path, text: str) -> list[Snippet]:
    """The ``python``/``py`` fenced blocks of one Markdown text, with their comments.

    Fences follow CommonMark: a block closes at a fence of the same character at least as long
    as the opening one, so a longer fence can show a ``python`` block without it being run.
    """
    lines = text.splitlines()
    found: list[Snippet] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        words = opening["info"].strip().strip("{}").split()
        language = words[0].lstrip(".").lower() if words else ""
        end = i + 1
        while end < len(lines):
            closing = _FENCE.match(lines[end])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            end += 1
        if language in LANGUAGES:
            # CommonMark: up to the opening fence's indentation is removed from each line.
            body = "\n".join(_dedent(line, indent) for line in lines[i + 1 : end]) + "\n"
            found.append(
                Snippet(
                    path,
                    Code(body, i + 2),
                    setup=_comment(lines, _neighbour(lines, i, -1), "setup"),
                    then=_comment(lines, _neighbour(lines, end, +1), "then"),
                )
            )
        i = end + 1
    return found


def _dedent(line: str, indent: int) -> str:
    return line[min(indent, len(line) - len(line.lstrip(" "))) :]


def _neighbour(lines: list[str], index: int, step: int) -> int:
    """The nearest non-blank line before (step -1) or after (step +1) ``index``."""
    index += step
    while 0 <= index < len(lines) and not lines[index].strip():
        index += step
    return index


def _comment(lines: list[str], edge: int, kind: str) -> Code | None:
    """The code in a ``<!-- kind:`` ... ``-->`` comment whose last line (setup) or first line
    (then) is line ``edge``, or None if there is none."""
    if not 0 <= edge < len(lines):
        return None
    if kind == "setup":
        if lines[edge].strip() != COMMENT_CLOSE:
            return None
        start, end = edge - 1, edge
        while start >= 0 and "<!--" not in lines[start] and COMMENT_CLOSE not in lines[start]:
            start -= 1
    else:
        start, end = edge, edge + 1
    opening = _COMMENT_OPEN.match(lines[start]) if start >= 0 else None
    if opening is None or opening["kind"] != kind:
        return None
    if opening["indent"]:
        # Python-Markdown shows an HTML comment inside a list item as text.
        raise ValueError(f"line {start + 1}: a {kind} comment must start at column 0")
    while end < len(lines) and lines[end].strip() != COMMENT_CLOSE:
        end += 1
    if end == len(lines):
        raise ValueError(f"line {start + 1}: the {kind} comment is not closed")
    return Code(textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n", start + 2)


SNIPPETS = [s for page in PAGES for s in find_snippets(page, page.read_text(encoding="utf-8"))]


def _compile(code: Code, path: Path) -> types.CodeType:
    # Padding keeps line numbers: tracebacks show the Markdown file's lines.
    return compile("\n" * (code.line - 1) + code.text, str(path), "exec", dont_inherit=True)


@contextmanager
def _globals_restored(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what the snippets change in this process: the global tracer provider (shut down),
    structlog's configuration, the root logger's handlers, the benchmark variant registry."""
    import benchmarks.variants

    monkeypatch.setenv("FASTPROF_SECRET", SECRET)
    provider = trace._TRACER_PROVIDER
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(benchmarks.variants, "VARIANTS", dict(benchmarks.variants.VARIANTS))
    structlog_config = structlog.get_config() if structlog.is_configured() else None
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        installed = trace._TRACER_PROVIDER
        if installed is not provider:
            getattr(installed, "shutdown", lambda: None)()  # the SDK's flushes and stops
        structlog.reset_defaults()
        if structlog_config is not None:
            structlog.configure(**structlog_config)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet (between its setup and then comments) runs without an error, a warning, a
    fastprof internal error or a thread left running once its tracer provider is shut down."""
    threads = set(threading.enumerate())
    module = types.ModuleType("docs_snippet")
    module.__file__ = str(snippet.path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    failure = None
    with _globals_restored(monkeypatch):
        try:
            for code in (snippet.setup, snippet.code, snippet.then):
                if code is not None:
                    exec(_compile(code, snippet.path), module.__dict__)
        except Exception as exc:
            # The snippet's frames and below only: pytest would print the page from line 1.
            assert exc.__traceback__ is not None
            failure = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    if failure is not None:
        pytest.fail(f"{snippet.id} failed:\n{failure}", pytrace=False)
    assert _internal_errors.counts() == {}
    started = set(threading.enumerate()) - threads
    for thread in started:  # e.g. anyio's worker threads stop shortly after their loop closed
        thread.join(timeout=2.0)
    assert [t.name for t in started if t.is_alive()] == []


def test_every_page_with_python_has_its_snippets_collected() -> None:
    """Guards the collector: the pages known to hold Python examples yield some."""
    pages = {s.path.relative_to(ROOT).as_posix() for s in SNIPPETS}
    assert {"README.md", "docs/dependencies.md", "docs/profiling.md", "docs/event-loop.md"} <= pages


def test_find_snippets_reads_comments_and_nested_fences() -> None:
    text = "\n".join(
        [
            "Intro",  # 1
            "<!-- setup:",  # 2
            "x = 1",  # 3
            "-->",  # 4
            "",  # 5
            "```python",  # 6
            "print(x)",  # 7
            "```",  # 8
            "<!-- then:",  # 9
            "assert x == 1",  # 10
            "-->",  # 11
            "<!-- a plain comment -->",  # 12
            "```py title='t'",  # 13
            "y = 2",  # 14
            "```",  # 15
            "````markdown",  # 16
            "```python",  # 17
            "not run",  # 18
            "```",  # 19
            "````",  # 20
            "```bash",  # 21
            "echo no",  # 22
            "```",  # 23
            "- item",  # 24
            "",  # 25
            "    ```python",  # 26
            "    z = 3",  # 27
            "    ```",  # 28
        ]
    )
    found = find_snippets(ROOT / "x.md", text)
    assert [(s.code, s.setup, s.then) for s in found] == [
        (Code("print(x)\n", 7), Code("x = 1\n", 3), Code("assert x == 1\n", 10)),
        (Code("y = 2\n", 14), None, None),
        (Code("z = 3\n", 27), None, None),
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "* item\n\n  <!-- setup:\n  x = 1\n  -->\n  ```python\n  print(x)\n  ```\n",
            "line 3: a setup comment must start at column 0",
        ),
        ("```python\nx = 1\n```\n<!-- then:\nassert x\n", "line 4: the then comment is not closed"),
    ],
)
def test_find_snippets_refuses_a_comment_it_cannot_run(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        find_snippets(ROOT / "x.md", text)


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes (no broken link or anchor, every page in ``nav``, every
    docstring readable) and the API reference is generated from the docstrings, as Markdown."""
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "fastprof" / "index.html").read_text(encoding="utf-8")
    assert 'id="fastprof.instrument"' in reference
    assert "Instrument a Starlette or FastAPI application" in reference  # its docstring
    assert ":class:`" not in reference  # scripts/griffe_rst.py turned the roles into code

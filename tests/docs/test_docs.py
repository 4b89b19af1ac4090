"""The documentation: the site builds with ``mkdocs build --strict``, and every Python snippet in
``docs/*.md`` and ``README.md`` runs.

A snippet is a fenced block whose language is ``python`` or ``py``; each runs in a fresh module
namespace, after the code of an optional ``<!-- setup: ... -->`` HTML comment right before it
(see docs/contributing.md, "Code snippets are tests"). No snippet can be skipped. Tracebacks point
at the Markdown file and line.
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
SETUP_OPEN = "<!-- setup:"
SETUP_CLOSE = "-->"
#: ``FASTPROF_SECRET`` for the snippets (docs/contributing.md says so).
SECRET = "docs-snippets-secret-0123456789abcdef"
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int
    """1-based line of the snippet's first code line."""
    code: str
    setup: str = ""
    setup_line: int = 0

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def find_snippets(path: Path, text: str) -> list[Snippet]:
    """The ``python``/``py`` fenced blocks of one Markdown text, with their setup comments.

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
            body = [_dedent(line, indent) for line in lines[i + 1 : end]]
            setup, setup_line = _setup_before(lines, i)
            found.append(Snippet(path, i + 2, "\n".join(body) + "\n", setup, setup_line))
        i = end + 1
    return found


def _dedent(line: str, indent: int) -> str:
    return line[min(indent, len(line) - len(line.lstrip(" "))) :]


def _setup_before(lines: list[str], fence_index: int) -> tuple[str, int]:
    """The code of a ``<!-- setup: ... -->`` comment ending right before a fence (blank lines
    between are allowed), and the 1-based line of its first code line."""
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or lines[j].strip() != SETUP_CLOSE:
        return "", 0
    start = j - 1
    while start >= 0 and not lines[start].lstrip().startswith(SETUP_OPEN):
        if SETUP_CLOSE in lines[start]:
            return "", 0  # some other comment
        start -= 1
    if start < 0:
        return "", 0
    if lines[start] != lines[start].lstrip():
        # Python-Markdown shows an HTML comment inside a list item as text.
        raise ValueError(f"line {start + 1}: a setup comment must start at column 0")
    first = lines[start].lstrip()[len(SETUP_OPEN) :].strip()
    if first:
        return first + "\n" + textwrap.dedent("\n".join(lines[start + 1 : j])) + "\n", start + 1
    return textwrap.dedent("\n".join(lines[start + 1 : j])) + "\n", start + 2


SNIPPETS = [s for page in PAGES for s in find_snippets(page, page.read_text(encoding="utf-8"))]


def _compile(code: str, path: Path, first_line: int) -> types.CodeType:
    # Padding keeps line numbers: tracebacks (and pytest's source display) show the Markdown line.
    return compile("\n" * (first_line - 1) + code, str(path), "exec", dont_inherit=True)


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
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
            installed.shutdown()  # type: ignore[union-attr]
        structlog.reset_defaults()
        if structlog_config is not None:
            structlog.configure(**structlog_config)
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.mark.usefixtures("isolated")
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippet (after its setup comment) runs without an error, a warning, a fastprof internal
    error or a leftover thread."""
    threads = set(threading.enumerate())
    module = types.ModuleType("docs_snippet")
    module.__file__ = str(snippet.path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    failure = None
    try:
        if snippet.setup:
            exec(_compile(snippet.setup, snippet.path, snippet.setup_line), module.__dict__)
        exec(_compile(snippet.code, snippet.path, snippet.line), module.__dict__)
    except Exception as exc:
        # The snippet's frames and below only: pytest would print the page from its first line.
        assert exc.__traceback__ is not None
        failure = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
    if failure is not None:
        pytest.fail(f"{snippet.id} failed:\n{failure}", pytrace=False)
    assert _internal_errors.counts() == {}
    assert [t.name for t in set(threading.enumerate()) - threads if not t.daemon] == []


def test_every_page_with_python_has_its_snippets_collected() -> None:
    """Guards the collector: the pages known to hold Python examples yield some."""
    pages = {s.path.relative_to(ROOT).as_posix() for s in SNIPPETS}
    assert {"README.md", "docs/dependencies.md", "docs/profiling.md", "docs/event-loop.md"} <= pages


def test_find_snippets_reads_setup_comments_and_nested_fences() -> None:
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
            "<!-- a plain comment -->",  # 9
            "```py title='t'",  # 10
            "y = 2",  # 11
            "```",  # 12
            "````markdown",  # 13
            "```python",  # 14
            "not run",  # 15
            "```",  # 16
            "````",  # 17
            "```bash",  # 18
            "echo no",  # 19
            "```",  # 20
            "- item",  # 21
            "",  # 22
            "    ```python",  # 23
            "    z = 3",  # 24
            "    ```",  # 25
        ]
    )
    found = find_snippets(ROOT / "x.md", text)
    assert [(s.line, s.code, s.setup, s.setup_line) for s in found] == [
        (7, "print(x)\n", "x = 1\n", 3),
        (11, "y = 2\n", "", 0),
        (24, "z = 3\n", "", 0),
    ]


def test_find_snippets_refuses_an_indented_setup_comment() -> None:
    text = "* item\n\n  <!-- setup:\n  x = 1\n  -->\n  ```python\n  print(x)\n  ```\n"
    with pytest.raises(ValueError, match="line 3: a setup comment must start at column 0"):
        find_snippets(ROOT / "x.md", text)


def test_mkdocs_build_is_strict_clean(tmp_path: Path) -> None:
    """``mkdocs build --strict`` passes (no broken link or anchor, every page in ``nav``, every
    docstring readable) and the API reference is generated from the docstrings."""
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
    assert "Instrument" in reference  # instrument()'s docstring, not only its name

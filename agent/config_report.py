"""Problems as the contract's lines: located by key (agent.tomlpos), one line each, in file order; and
TOML syntax errors as "message (line N, column M)"."""

from __future__ import annotations

import re

from agent.tomlpos import KeyLocator, format_path
from agent.tomlpos import Path as ConfigPath
from drivers.sdk.config import Problem


def format_problems(problems: list[Problem], text: str | None, labels: dict[ConfigPath, str]) -> list[str]:
    """The contract's lines, in the order of the file.

    A problem is located at its key, else at the nearest enclosing table, else at line 1 (an empty file,
    a missing top-level table). Without a TOML text (the Python API) there are no lines.
    """
    if text is None:
        return [f"{format_path(p.path, labels) or 'agent.toml'}: {one_line(p.message)}" for p in problems]
    # Keys are located only when there is something to report: a valid file never pays for it.
    locator = KeyLocator(text)
    located = []
    for p in problems:
        line = locator.line_of(p.path) or 1
        located.append((line, f"{format_path(p.path, labels) or 'agent.toml'}: {one_line(p.message)} (line {line})"))
    located.sort(key=lambda item: item[0])
    return [msg for _, msg in located]


def one_line(text: str) -> str:
    """Control characters and line separators escaped: one problem is always one line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def syntax_error(err: Exception, text: str) -> str:
    """A TOML syntax error as "message (line N, column M)"."""
    if isinstance(err, RecursionError):
        # tomllib recurses per nested array or inline table; point at the first deep run of openers.
        m = re.search(r"(?:[\[{]\s*){64}", text)
        pos = m.start() if m else 0
        line = text.count("\n", 0, pos) + 1
        column = pos - text.rfind("\n", 0, pos)
        return f"values nested too deeply (line {line}, column {column})"
    # tomllib says "... (at line N, column M)" or "... (at end of document)".
    msg = str(err)
    if m := re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg):
        return f"{msg[: m.start()]} (line {m.group(1)}, column {m.group(2)})"
    if m := re.search(r"\s*\(at end of document\)$", msg):
        lines = text.split("\n")
        return f"{msg[: m.start()]} (line {len(lines)}, column {len(lines[-1]) + 1})"
    return f"{msg} (line 1, column 1)"

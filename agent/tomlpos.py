"""Locate keys of a TOML document by line, since tomllib gives no positions.

A small line scanner that understands table headers, arrays of tables, dotted keys and multi-line
values well enough to map a config path such as ("equipment", 2, "connection", "endpoint") to the
line where that key, or else its nearest enclosing table header, stands.
"""

from __future__ import annotations

import re

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_KEY = re.compile(r"""^\s*((?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)(?:\s*\.\s*(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+))*)\s*=""")
_PART = re.compile(r"""\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*(?:\.|$)""")


def _split_key(text: str) -> list[str]:
    parts = []
    for m in _PART.finditer(text):
        p = m.group(1)
        if p[0] in "\"'":
            p = p[1:-1]
        parts.append(p)
    return parts


def _strip_strings(line: str) -> str:
    """Drop string contents and comments so brackets inside them do not count."""
    out = []
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            break
        else:
            out.append(c)
        i += 1
    return "".join(out)


class KeyLocator:
    """Maps config paths to 1-based line numbers of a TOML text."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        self._scan(text)

    def _scan(self, text: str) -> None:
        counters: dict[Path, int] = {}
        table: Path = ()
        depth = 0  # open brackets or braces of a multi-line value
        in_multiline = ""
        for lineno, raw in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if raw.count(in_multiline) % 2 == 1:
                    in_multiline = ""
                continue
            if depth > 0:
                body = _strip_strings(raw)
                depth += body.count("[") + body.count("{") - body.count("]") - body.count("}")
                continue
            header = _HEADER.match(raw)
            if header and not _KEY.match(raw):
                names = _split_key(header.group(2))
                base = (*self._resolve(names[:-1], counters), names[-1])
                if header.group(1) == "[[":
                    idx = counters.get(base, -1) + 1
                    counters[base] = idx
                    table = (*base, idx)
                else:
                    table = self._resolve(names, counters)
                self.lines.setdefault(table, lineno)
                continue
            key = _KEY.match(raw)
            if not key:
                continue
            path = (*table, *_split_key(key.group(1)))
            self.lines.setdefault(path, lineno)
            rest = raw[key.end() :]
            for q in ('"""', "'''"):
                if q in rest and rest.count(q) % 2 == 1:
                    in_multiline = q
            if not in_multiline:
                body = _strip_strings(rest)
                depth = body.count("[") + body.count("{") - body.count("]") - body.count("}")
                depth = max(depth, 0)

    def _resolve(self, names: list[str], counters: dict[Path, int]) -> Path:
        """Turn a dotted header into a path, indexing arrays of tables at their latest element."""
        path: Path = ()
        for name in names:
            path = (*path, name)
            if path in counters:
                path = (*path, counters[path])
        return path

    def line_of(self, path: Path) -> int | None:
        """The line of `path`, else of its nearest located ancestor."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None


def format_path(path: Path) -> str:
    """("equipment", 2, "connection") -> "equipment[2].connection"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out

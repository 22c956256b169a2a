"""Locate keys of a TOML document by line, since tomllib gives no positions.

A small line scanner that understands table headers, arrays of tables, dotted keys and multi-line
values well enough to map a config path such as ("equipment", 2, "connection", "endpoint") to the
line where that key, or else its nearest enclosing table header, stands.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping

Path = tuple[str | int, ...]

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*(\]\]?)\s*(#.*)?$")
_ONE = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY = re.compile(rf"""^\s*({_ONE}(?:\s*\.\s*{_ONE})*)\s*=""")
_PART = re.compile(rf"""\s*({_ONE})\s*(?:\.|$)""")


def _split_key(text: str) -> list[str]:
    parts = []
    for m in _PART.finditer(text):
        p = m.group(1)
        if p[0] == "'":
            p = p[1:-1]
        elif p[0] == '"':
            p = _basic_string(p)
        parts.append(p)
    return parts


def _basic_string(quoted: str) -> str:
    """A quoted key with its escapes decoded, by tomllib itself; as written when it is not valid TOML."""
    try:
        return next(iter(tomllib.loads(f"{quoted} = 0")))
    except (tomllib.TOMLDecodeError, StopIteration):
        return quoted[1:-1]


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
        # Lines as TOML counts them: only "\n" ends one (str.splitlines would also split on characters
        # such as U+2028 that TOML allows inside strings and comments, and shift every later line).
        for lineno, raw in enumerate(text.split("\n"), start=1):
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
                    self.lines.setdefault(base, lineno)  # the array itself stands at its first element
                else:
                    table = self._resolve(names, counters)
                self.lines.setdefault(table, lineno)
                continue
            key = _KEY.match(raw)
            if not key:
                continue
            path = (*table, *_split_key(key.group(1)))
            # A dotted key (`a.b = 1`) also defines its parent tables here.
            for end in range(len(table) + 1, len(path) + 1):
                self.lines.setdefault(path[:end], lineno)
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


def format_path(path: Path, labels: Mapping[Path, str] | None = None) -> str:
    """("equipment", 2, "connection") -> "equipment[2].connection", or "equipment[plc-2].connection" when
    `labels` maps ("equipment", 2) to "plc-2". A key that is not a bare TOML key is quoted as TOML quotes it."""
    out = ""
    for i, part in enumerate(path):
        if isinstance(part, int):
            label = labels.get(path[: i + 1]) if labels else None
            out += f"[{part if label is None else label}]"
        else:
            out += ("." if out else "") + (part if _BARE.fullmatch(part) else quote_key(part))
    return out


def quote_key(key: str) -> str:
    """A key as a TOML basic string, control characters escaped, so it prints on one line."""
    return '"' + _ESCAPE.sub(lambda m: _escape(m.group()), key) + '"'


def _escape(char: str) -> str:
    return {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(char, f"\\u{ord(char):04X}")


_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f-\x9f\u2028\u2029]')

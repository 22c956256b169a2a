"""Fuzzing check-config: mutations of the shipped agent.toml and random TOML documents.

Whatever the text, check-config exits 0 or 2 without a traceback, and every problem line is located
within the file: `path: message (line N)`, or `agent.toml: message (line N, column M)` for a syntax error.
check-config runs in-process (the CLI's main function), one file per example.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main
from agent.config import (
    AgentSection,
    AlertConfig,
    ApiKey,
    CommandBase,
    EquipmentBase,
    HttpSection,
    MpmSection,
    MqttSection,
    StatusConfig,
)
from drivers.registry import get_driver, known_drivers
from peers import ROOT

SHIPPED = (ROOT / "agent.toml").read_text()
PROBLEM = re.compile(r"^\S.*: .+ \(line (\d+)\)$")
SYNTAX = re.compile(r"^agent\.toml: .+ \(line (\d+), column (\d+)\)$")


def _field_names() -> list[str]:
    models: list[Any] = [
        AgentSection,
        MqttSection,
        MpmSection,
        HttpSection,
        ApiKey,
        EquipmentBase,
        StatusConfig,
        AlertConfig,
        CommandBase,
    ]
    for name in known_drivers():
        cls = get_driver(name)
        models += [cls.connection_model, cls.tag_model, cls.command_model]
    # driver_modules is left out: a random module name must never be imported by a test.
    return sorted({f for m in models for f in m.model_fields} - {"driver_modules"})


FIELDS = _field_names()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check(folder: Path, text: str) -> tuple[int, list[str]]:
    path = folder / "agent.toml"
    path.write_text(text, encoding="utf-8")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check-config", "--config", str(path)])
    return code, out.getvalue().splitlines()


def assert_located(text: str, code: int, lines: list[str]) -> None:
    """The property: exit 0 or 2, and every problem located within the file."""
    assert code in (0, 2), (code, lines)
    if code == 0:
        assert len(lines) == 1 and lines[0].endswith("equipment)"), lines
        return
    assert lines, "exit 2 without a problem line"
    last = text.count("\n") + 1
    syntax = [line for line in lines if SYNTAX.match(line)]
    assert not syntax or lines == syntax[:1], lines  # a syntax error is reported alone
    for line in lines:
        m = SYNTAX.match(line) or PROBLEM.match(line)
        assert m, f"not a located problem line: {line!r}"
        assert 1 <= int(m.group(1)) <= last, (line, last)


# ---- TOML values and documents -------------------------------------------------------------------


def render_str(s: str) -> str:
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def render_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else render_str(k)


def render(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return render_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(render(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{render_key(k)} = {render(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dump(doc: dict[str, Any]) -> str:
    """TOML text: tables and arrays of tables two levels deep get headers, deeper ones are inline."""
    lines: list[str] = []

    def emit(path: list[str], table: dict[str, Any]) -> None:
        subs: list[tuple[str, Any]] = []
        for k, v in table.items():
            is_table = isinstance(v, dict)
            is_array = isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
            if (is_table or is_array) and len(path) < 2:
                subs.append((k, v))
            else:
                lines.append(f"{render_key(k)} = {render(v)}")
        for k, v in subs:
            name = ".".join(render_key(p) for p in [*path, k])
            for item in v if isinstance(v, list) else [v]:
                lines.append(f"[[{name}]]" if isinstance(v, list) else f"[{name}]")
                emit([*path, k], item)

    emit([], doc)
    return "\n".join(lines) + "\n"


scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.booleans(),
    st.sampled_from(["cell-1", "plc-1", "state", "temp", "write", "idle", "mqtt://127.0.0.1:1883", "127.0.0.1:8710"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(FIELDS) | st.text(min_size=1, max_size=8)


def table(fields: st.SearchStrategy[str] = keys) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(fields, values, max_size=5)


equipment = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["plc-1", "plc-2", "bad id", ""]) | st.text(max_size=6),
        "driver": st.sampled_from([*known_drivers(), "profibus"]),
    },
    optional={
        "connection": table(),
        "status": table(),
        "tags": st.lists(table(), max_size=3),
        "alerts": st.lists(table(), max_size=2),
        "commands": st.lists(table(), max_size=2),
        "type": st.sampled_from(["plc", "cmm", "toaster"]),
    },
).flatmap(lambda eq: table().map(lambda extra: {**extra, **eq}))

documents = st.fixed_dictionaries(
    {},
    optional={
        "agent": st.fixed_dictionaries({}, optional={"id": scalars, "site": scalars}).flatmap(
            lambda t: table().map(lambda extra: {**extra, **t})
        ),
        "mqtt": table(),
        "mpm": table(),
        "http": table(),
        "equipment": st.lists(equipment, max_size=3) | values,
    },
).flatmap(lambda doc: st.dictionaries(keys, values, max_size=2).map(lambda extra: {**extra, **doc}))


@given(doc=documents)
def test_random_documents_are_reported_located(folder: Path, doc: dict[str, Any]) -> None:
    text = dump(doc)
    code, lines = check(folder, text)
    assert_located(text, code, lines)


# ---- mutations of the shipped file ---------------------------------------------------------------

KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_-]+)(\s*=\s*)(.*)$")


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = SHIPPED.split("\n")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["delete", "duplicate", "swap", "value", "key", "insert", "chars", "truncate", "header"])
        )
        i = draw(st.integers(0, len(lines) - 1))
        m = KEY_LINE.match(lines[i])
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "value" and m:
            lines[i] = m.group(1) + m.group(2) + m.group(3) + render(draw(values))
        elif op == "key" and m:
            key = m.group(2)
            at = draw(st.integers(0, len(key) - 1))
            near = draw(
                st.sampled_from([key[:at] + key[at + 1 :], key[:at] + "x" + key[at:], key[::-1]])
                | st.sampled_from(FIELDS)
            )
            if near:
                lines[i] = m.group(1) + near + m.group(3) + m.group(4)
        elif op == "insert":
            lines.insert(i, f"{render_key(draw(keys))} = {render(draw(values))}")
        elif op == "header":
            lines.insert(i, draw(st.sampled_from(["[agent]", "[mqtt]", "[[equipment]]", "[equipment.connection]"])))
        elif op == "chars":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.text(min_size=1, max_size=4)) + lines[i][at:]
        elif op == "truncate":
            lines = lines[: i + 1]
            lines[-1] = lines[-1][: draw(st.integers(0, len(lines[-1])))]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@given(text=mutated())
def test_mutated_shipped_config_is_reported_located(folder: Path, text: str) -> None:
    code, lines = check(folder, text)
    assert_located(text, code, lines)


def test_shipped_config_is_the_seed(folder: Path) -> None:
    count = len(tomllib.loads(SHIPPED)["equipment"])
    assert check(folder, SHIPPED) == (0, [f"{folder / 'agent.toml'}: valid ({count} equipment)"])

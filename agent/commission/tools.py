"""`edge-agent browse` and `edge-agent scan`: the protocol code lives in the driver's `commission` module,
found through the registry by the driver's name (the core imports no concrete driver)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.config import config_path, load_config
from agent.errors import ConfigError
from drivers.sdk.registry import get_driver


def commission_module(driver: str) -> ModuleType:
    """The `commission` module next to the driver registered as `driver`."""
    package = get_driver(driver).__module__.rpartition(".")[0]
    return importlib.import_module(f"{package}.commission")


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1


def run_tool(args: argparse.Namespace) -> int:
    """Dispatch `browse opcua` and `scan modbus`."""
    try:
        if args.cmd == "browse":
            return _browse(args)
        return _scan(args)
    except ConfigError as err:
        print("\n".join(err.problems), file=sys.stderr)
        return 2
    except (ConnectionError, OSError, TimeoutError) as err:
        return _fail(f"cannot reach {getattr(args, 'url', None) or args.target}: {err or type(err).__name__}")


def _browse(args: argparse.Namespace) -> int:
    mod = commission_module("opcua")
    connection: Any
    state_dir = Path(tempfile.mkdtemp(prefix="edge-agent-browse-"))
    eid = "browse"
    if args.config or args.equipment:
        cfg = load_config(config_path(args.config))
        eq = next((e for e in cfg.equipment if e.id == args.equipment), None)
        if eq is None or eq.driver != "opcua":
            return _fail(f"no opcua equipment {args.equipment!r} in the config (give --equipment ID)")
        connection = eq.connection.model_copy(update={"endpoint": args.url})
        connection._secrets = dict(eq.connection._secrets)
        state_dir, eid = cfg.agent.state_dir, eq.id  # the client certificate the server already trusts
    else:
        connection = get_driver("opcua").connection_model.model_validate({"endpoint": args.url})
    found = asyncio.run(mod.browse(connection, args.node, args.depth, state_dir, eid))
    if args.toml:
        print(f"# {len(found)} variables below {args.node} on {args.url}")
        print(mod.stanzas(found))
        return 0
    rows = [("NODE", "BROWSE PATH", "TYPE", "ACCESS", "VALUE")]
    rows += [(v.node, v.path, v.data_type, v.access, json.dumps(v.value, default=str)[:40]) for v in found]
    _table(rows)
    return 0


def _scan(args: argparse.Namespace) -> int:
    mod = commission_module("modbus")
    try:
        first, _, last = args.range.partition("-")
        lo, hi = int(first), int(last or first)
        if not 0 <= lo <= hi <= 65535:
            raise ValueError
    except ValueError:
        return _fail(f"--range {args.range!r}: give A-B with 0 <= A <= B <= 65535")
    conn = mod.connection_for(args.target, args.unit, args.timeout, args.baudrate, args.parity)
    tables = args.table or ["holding", "input"]
    found = asyncio.run(mod.scan(conn, tables, lo, hi))
    if args.toml:
        print(f"# {len(found)} addresses answered on {conn.endpoint}, {', '.join(tables)} {lo}-{hi}")
        print(mod.stanzas(found))
        return 0
    for table, a, b in mod.ranges(found):
        print(f"{table} {a}-{b}" if a != b else f"{table} {a}")
    rows = [("TABLE", "ADDRESS", "RAW")] + [(f.table, str(f.address), str(f.value)) for f in found]
    _table(rows)
    if not found:
        return _fail(f"no address of {', '.join(tables)} {lo}-{hi} answered on {conn.endpoint}")
    return 0


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

"""The commissioning commands' parsers and dispatch: `config`, `test`, `browse`, `scan`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from drivers.sdk.registry import known_drivers

CONFIG_HELP = "config file (default: $EDGE_AGENT_CONFIG, else /etc/edge-agent/agent.toml)"


def add_commission_parsers(sub: Any) -> None:
    """Add `config`, `test`, `browse` and `scan` to the subcommand parser `sub`."""
    cfg = sub.add_parser(
        "config",
        help="print a commented sample config or the config's JSON Schema",
        description="Print a commented sample config (every key with its default and meaning) "
        "or the JSON Schema of the whole config, for editors.",
    )
    cfg_sub = cfg.add_subparsers(dest="config_cmd", required=True, metavar="WHAT")
    sample = cfg_sub.add_parser("sample", help="a commented sample that passes check-config")
    sample.add_argument(
        "--driver",
        action="append",
        choices=known_drivers(),
        help="one equipment of this driver (repeatable; default: one of each built-in)",
    )
    cfg_sub.add_parser("schema", help="JSON Schema of agent.toml (every driver), e.g. for the Even Better TOML editor")
    test = sub.add_parser(
        "test",
        help="dry run: connect to each equipment once, read every tag, show what would be published",
        description="Dry run: connect to each equipment once, read every tag, print decoded values with their "
        "quality, the status that would be derived and the MQTT payloads that would be published. Nothing is "
        "published and nothing is written. Exit 1 naming every tag that could not be read, 2 for a bad config.",
    )
    test.add_argument("--config", help=CONFIG_HELP)
    test.add_argument("--equipment", action="append", metavar="ID", help="only this equipment (repeatable)")
    test.add_argument("--timeout", type=float, default=15.0, help="seconds per equipment (default 15)")
    test.add_argument(
        "--credentials",
        metavar="DIR",
        help="read /run/credentials/edge-agent.service/NAME secrets from DIR/NAME, as check-config --credentials",
    )
    browse = sub.add_parser(
        "browse",
        help="browse a device's address space (OPC UA)",
        description="Browse an OPC UA server: variables with data type and access level; "
        "with --toml, ready [[equipment.tags]] stanzas using nsu= node ids.",
    )
    browse.add_argument("protocol", choices=["opcua"])
    browse.add_argument("url", help="opc.tcp://host:port")
    browse.add_argument("--node", default="i=85", help="start node (default i=85, the Objects folder)")
    browse.add_argument("--depth", type=int, default=6, help="levels below the start node (default 6)")
    browse.add_argument("--toml", action="store_true", help="print [[equipment.tags]] stanzas")
    browse.add_argument("--config", help="take security options from this config's equipment (with --equipment)")
    browse.add_argument("--equipment", help="the equipment whose [equipment.connection] security to use")
    scan = sub.add_parser(
        "scan",
        help="find the registers a device answers (Modbus)",
        description="Read a Modbus device's table in blocks and list the addresses that answer "
        "with their raw values; with --toml, [[equipment.tags]] stanzas.",
    )
    scan.add_argument("protocol", choices=["modbus"])
    scan.add_argument("target", help="HOST[:PORT] for TCP (port 502 by default), or a serial device for RTU")
    scan.add_argument("--unit", type=int, default=1, help="unit id (default 1)")
    scan.add_argument(
        "--table",
        choices=["holding", "input", "coil", "discrete"],
        action="append",
        help="table to scan (repeatable; default holding and input)",
    )
    scan.add_argument("--range", default="0-99", help="addresses A-B, 0-based, inclusive (default 0-99)")
    scan.add_argument("--baudrate", type=int, default=19200, help="RTU line speed (default 19200)")
    scan.add_argument("--parity", choices=["N", "E", "O"], default="N", help="RTU parity (default N)")
    scan.add_argument("--timeout", type=float, default=1.0, help="seconds per request (default 1)")
    scan.add_argument("--toml", action="store_true", help="print [[equipment.tags]] stanzas")


def run_commission(args: argparse.Namespace) -> int:
    """Run a commissioning command; 2 for an unknown one."""
    if args.cmd == "config":
        if args.config_cmd == "sample":
            from agent.commission.sample import sample

            sys.stdout.write(sample(args.driver))
            return 0
        from agent.commission.schema import schema

        print(json.dumps(schema(), indent=2))
        return 0
    if args.cmd == "test":
        from agent.commission.dryrun import run_test

        return run_test(args)
    if args.cmd in ("browse", "scan"):
        from agent.commission.tools import run_tool

        return run_tool(args)
    return 2

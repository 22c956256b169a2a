"""The `edge-agent` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from agent import __version__
from agent.config import config_path, load_config
from agent.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description="Shop-floor edge daemon")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_text in (
        ("run", "run the daemon in the foreground"),
        ("check-config", "validate the configuration"),
        ("simulate", "start the built-in simulators the configuration points at"),
    ):
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("--config", help="config file (default: $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)")
    st = sub.add_parser("status", help="equipment table from the local HTTP API")
    st.add_argument("--url", default=None, help="API base URL (default http://127.0.0.1:8710)")
    st.add_argument("--key-file", default=None, help="file holding an API key (or $EDGE_AGENT_API_KEY)")
    st.add_argument("--config", help="read [http] listen from this config when --url is not given")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.cmd == "version":
        print(f"edge-agent {__version__}")
        return 0
    if args.cmd == "check-config":
        return check_config(config_path(args.config))
    if args.cmd == "run":
        from agent.daemon import run_daemon

        return run_daemon(config_path(args.config))
    if args.cmd == "simulate":
        from agent.simulate import run_simulators

        return run_simulators(config_path(args.config))
    if args.cmd == "status":
        return status(args.url, args.key_file, args.config)
    return 2


def check_config(path: Path) -> int:
    """Print one line per problem; 0 when valid, 2 when not."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        for line in err.problems:
            print(line)
        return 2
    print(f"{path}: valid ({len(cfg.equipment)} equipment)")
    return 0


def status(url: str | None, key_file: str | None, config: str | None) -> int:
    """Print the equipment table; 1 when the daemon cannot be reached."""
    if url is None:
        url = "http://127.0.0.1:8710"
        path = config_path(config)
        if config or path.exists():
            try:
                cfg = load_config(path)
                host = cfg.http.host
                url = f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http.port}"
            except ConfigError:
                pass
    key = os.environ.get("EDGE_AGENT_API_KEY")
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as err:
            print(f"cannot read key file {key_file}: {err.strerror}", file=sys.stderr)
            return 1
    req = urllib.request.Request(url.rstrip("/") + "/api/v1/equipment")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        print(f"{url}: HTTP {err.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as err:
        print(f"{url}: unreachable ({getattr(err, 'reason', err)})", file=sys.stderr)
        return 1
    rows = [("EQUIPMENT", "TYPE", "STATUS", "OPERATION", "PROGRESS", "LAST VALUE")]
    for eq in data.get("equipment", []):
        progress = eq.get("progress")
        age = eq.get("last_value_age_s")
        rows.append(
            (
                str(eq.get("equipment_id")),
                str(eq.get("type")),
                str(eq.get("status")),
                str(eq.get("current_operation") or "-"),
                f"{progress * 100:.0f}%" if isinstance(progress, (int, float)) else "-",
                f"{age:.1f}s ago" if isinstance(age, (int, float)) else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0

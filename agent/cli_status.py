"""`edge-agent status` (the equipment table of a running daemon) and loading a config as the service sees it."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, config_path, parse_config
from agent.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8710"
#: Where the unit's LoadCredential= puts secrets; configs name them by this path.
SERVICE_CREDENTIALS = "/run/credentials/edge-agent.service/"


def load_with_credentials(path: Path, credentials: Path) -> AgentConfig:
    """The config with secrets under /run/credentials/edge-agent.service/ read from `credentials` instead."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read: {getattr(err, 'strerror', None) or err}"]) from err
    prefix = str(credentials.resolve()).rstrip("/") + "/"
    return parse_config(text.replace(SERVICE_CREDENTIALS, prefix), path)


def read_without_secrets(path: Path) -> AgentConfig:
    """The config validated without reading its secret files (an admin shell cannot read the service's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read: {getattr(err, 'strerror', None) or err}"]) from err
    return parse_config(text, path, resolve_secrets=False)


def api_url(config: str | None) -> tuple[str, str | None]:
    """The API URL from the config's [http] listen, and why the default is used when it cannot be read."""
    path = config_path(config)
    if not config and not path.exists():
        return DEFAULT_URL, f"no config at {path} (give --config or --url)"
    try:
        cfg = read_without_secrets(path)
    except ConfigError as err:
        if "cannot read" in err.problems[0]:
            return DEFAULT_URL, err.problems[0]
        return DEFAULT_URL, f"{path} is not valid ({len(err.problems)} problem(s), first: {err.problems[0]})"
    host = cfg.http.host
    return f"http://{'[' + host + ']' if ':' in host else host}:{cfg.http.port}", None


def _get(url: str, path: str, key: str | None) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + path)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _fetch(url: str, key: str | None, alerts: bool = False) -> dict[str, Any]:
    """The equipment list; with `alerts`, each equipment's active alerts from `/api/v1/alerts` beside it."""
    data = _get(url, "/api/v1/equipment", key)
    if alerts:
        try:
            active = _get(url, "/api/v1/alerts", key).get("alerts") or []
        except (urllib.error.URLError, OSError, ValueError):
            active = []  # a daemon without the route: the table without alerts
        for eq in data.get("equipment", []):
            eid = eq.get("equipment_id")
            eq["alerts"] = [a for a in active if isinstance(a, dict) and a.get("equipment_id") == eid]
    return data


def table(data: dict[str, Any], details: bool = False) -> list[str]:
    """The equipment table; with `details`, a line per active alert and per tag not of good quality."""
    rows = [("EQUIPMENT", "TYPE", "STATUS", "OPERATION", "PROGRESS", "LAST VALUE")]
    notes: list[str] = []
    for eq in data.get("equipment", []):
        progress = eq.get("progress")
        age = eq.get("last_value_age_s")
        eid = str(eq.get("equipment_id"))
        rows.append(
            (
                eid,
                str(eq.get("type")),
                str(eq.get("status")),
                str(eq.get("current_operation") or "-"),
                f"{progress * 100:.0f}%" if isinstance(progress, (int, float)) else "-",
                f"{age:.1f}s ago" if isinstance(age, (int, float)) else "-",
            )
        )
        for alert in eq.get("alerts") or eq.get("active_alerts") or []:
            notes.append(f"ALERT {eid}: {alert.get('message') or alert}" if isinstance(alert, dict) else f"ALERT {eid}")
        for tag, v in (eq.get("values") or {}).items():
            if isinstance(v, dict) and v.get("quality") not in (None, "good"):
                notes.append(f"BAD   {eid}.{tag}: quality {v.get('quality')}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines + (notes if details else [])


def status(url: str | None, key_file: str | None, config: str | None, watch: float | None = None) -> int:
    """Print the equipment table (redrawn every `watch` seconds); 1 when the daemon cannot be reached."""
    if url is None:
        url, why = api_url(config)
        if why:
            print(f"{why}; trying {url}", file=sys.stderr)
    key = os.environ.get("EDGE_AGENT_API_KEY")
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as err:
            print(f"cannot read key file {key_file}: {err.strerror}", file=sys.stderr)
            return 1
    while True:
        try:
            data = _fetch(url, key, alerts=watch is not None)
        except urllib.error.HTTPError as err:
            print(f"{url}: HTTP {err.code}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"{url}: unreachable ({getattr(err, 'reason', err)})", file=sys.stderr)
            return 1
        if watch is None:
            print("\n".join(table(data)))
            return 0
        print("\033[H\033[J" + time.strftime("%H:%M:%S") + f"  {url}\n" + "\n".join(table(data, details=True)))
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return 0

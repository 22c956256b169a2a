"""The OpenAPI description at /api/v1/openapi.json: every route is in it, every path in it answers."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import load_config
from agent.config_holder import ConfigHolder
from agent.http import HttpApi, HttpDeps
from agent.monitor import Monitor
from peers import GUARD_S, Broker, Daemon, free_port, scripted_equipment, write_config

KEY = "admin-key-789"
EXAMPLES = {"eid": "press-1", "command": "reset", "id": "1", "name": "app.js"}


def routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the API's application has (HEAD comes with GET)."""
    cfg = load_config(write_config(tmp_path, free_port()))
    deps = HttpDeps(
        config=ConfigHolder(cfg),
        router=None,  # type: ignore[arg-type]
        monitor=Monitor(cfg, None),  # type: ignore[arg-type]
        health=lambda: ({}, True),
        refresh_metrics=lambda: None,
        dead_letters=lambda: None,
    )
    app = HttpApi(deps).app()
    return {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}  # type: ignore[union-attr]


def call(port: int, method: str, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method.upper())
    req.add_header("Authorization", f"Bearer {KEY}")
    try:
        with urllib.request.urlopen(req, timeout=GUARD_S) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def test_every_route_documented_and_every_documented_route_answers(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    keys = '[[http.api_keys]]\nname = "admin"\nkey_env = "EA_ADMIN"\nrole = "admin"\n'
    http = f'[http]\nlisten = "127.0.0.1:{port}"\n{keys}'
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", tmp_path / "press.jsonl"), http=http)
    daemon = Daemon(cfg, env={"EA_ADMIN": KEY}).start()
    try:
        daemon.wait_log("http_listening")
        status, doc = call(port, "get", "/api/v1/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.1")
        documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
        (tmp_path / "app").mkdir()
        have = routes(tmp_path / "app")
        assert have == documented, {"undocumented": have - documented, "no such route": documented - have}
        for method, path in sorted(documented):
            concrete = re.sub(r"\{(\w+)\}", lambda m: EXAMPLES[m.group(1)], path)
            status, body = call(port, method, concrete)
            # answered by the route itself: not the "no route" 404 nor 405 of an unknown path or method
            no_route = status == 404 and body and body["error"]["message"].startswith("no route")
            assert not no_route and status != 405, (method, concrete, status, body)
            assert status < 500, (method, concrete, status, body)
    finally:
        daemon.stop()

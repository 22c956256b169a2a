"""The local HTTP API against a running daemon: keys and roles, errors, commands, metrics, health."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peers import Broker, Daemon, free_port, metric_total, script_line, scripted_equipment, wait_until, write_config

KEYS = {"viewer": "view-key-123", "operator": "op-key-456", "admin": "admin-key-789"}
ENV = {f"EA_TEST_{role.upper()}_KEY": key for role, key in KEYS.items()}


def http_section(port: int, extra: str = "") -> str:
    keys = "".join(
        f'[[http.api_keys]]\nname = "{role}-key"\nkey_env = "EA_TEST_{role.upper()}_KEY"\nrole = "{role}"\n'
        for role in KEYS
    )
    return f'[http]\nlisten = "127.0.0.1:{port}"\nunhealthy_after_s = 1\nmax_body_bytes = 2048\n{extra}\n{keys}'


def call(
    port: int, method: str, path: str, key: str | None = None, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any, str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as err:
        text = err.read().decode()
        status = err.code
    try:
        return status, json.loads(text), text
    except ValueError:
        return status, None, text


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, (status, body)
    err = body["error"]
    assert set(err) == {"code", "message", "category", "details", "timestamp", "request_id"}, err
    assert err["request_id"] and err["message"]


def test_routes_keys_and_roles(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    down = tmp_path / "lathe.down"
    down.write_text("")
    body = scripted_equipment("press-1", script).replace(
        'name = "set_speed"\nkind = "write"', 'name = "set_speed"\nkind = "write"\nrole = "operator"'
    )
    body = body.replace('name = "reset"\nkind = "reset"', 'name = "reset"\nkind = "reset"\nrole = "admin"')
    body += scripted_equipment("lathe-1", tmp_path / "lathe.jsonl", down_file=down)
    cfg = write_config(tmp_path, broker.port, body, http=http_section(port))
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        script_line(script, tag="state", value=0)
        script_line(script, tag="temp", value=21.5)
        wait_until(lambda: call(port, "GET", "/api/v1/equipment/press-1", KEYS["viewer"])[1].get("status") == "idle")
        # reads: no key 401, wrong key 401, every role 200
        for path in ("/api/v1/equipment", "/api/v1/equipment/press-1", "/api/v1/dead-letters"):
            s, b, _ = call(port, "GET", path)
            assert_error(s, b, 401)
            s, b, _ = call(port, "GET", path, "wrong-key")
            assert_error(s, b, 401)
            for role in KEYS:
                s, b, _ = call(port, "GET", path, KEYS[role])
                if path == "/api/v1/dead-letters" and role != "admin":  # dead letters carry process data
                    assert_error(s, b, 403)
                else:
                    assert s == 200, (path, role, b)
        s, b, _ = call(port, "GET", "/api/v1/equipment", KEYS["viewer"])
        press = next(e for e in b["equipment"] if e["equipment_id"] == "press-1")
        assert press["values"]["temp"]["value"] == 21.5 and press["values"]["temp"]["unit"] == "degC"
        s, b, _ = call(port, "GET", "/api/v1/equipment/drill-9", KEYS["viewer"])
        assert_error(s, b, 404)
        s, b, _ = call(port, "GET", "/no/such/route", KEYS["viewer"])
        assert_error(s, b, 404)
        # /healthz needs no key; /metrics is open unless metrics_auth
        s, b, _ = call(port, "GET", "/healthz")
        assert s == 200 and b["components"]["mqtt"]["status"] == "up"
        assert b["components"]["drivers"]["lathe-1"]["status"] == "down" and b["status"] == "degraded"
        # commands: role checks, then the router
        cmd = "/api/v1/equipment/press-1/commands/set_speed"
        s, b, _ = call(port, "POST", cmd, None, {"parameters": {"value": 10}})
        assert_error(s, b, 401)
        s, b, _ = call(port, "POST", cmd, "wrong-key", {"parameters": {"value": 10}})
        assert_error(s, b, 401)
        s, b, _ = call(port, "POST", cmd, KEYS["viewer"], {"parameters": {"value": 10}})
        assert_error(s, b, 403)
        s, b, _ = call(port, "POST", cmd, KEYS["operator"], {"parameters": {"value": 1500}})
        assert s == 200 and b["success"] is True and b["request_id"], b
        s, b, _ = call(port, "POST", cmd, KEYS["admin"], {"parameters": {"value": 1600}})
        assert s == 200 and b["success"] is True
        s, b, _ = call(port, "POST", cmd, KEYS["operator"], {"parameters": {"value": 99999}})
        assert s == 422 and b["success"] is False and b["data"]["reason"] == "out_of_range"
        s, b, _ = call(port, "POST", cmd, KEYS["operator"], {"parameters": {"value": "fast"}})
        assert s == 422 and b["data"]["reason"] == "bad_parameters"
        s, b, _ = call(
            port, "POST", "/api/v1/equipment/press-1/commands/refused", KEYS["operator"], {"parameters": {"value": 1}}
        )
        assert s == 422 and b["success"] is False
        s, b, _ = call(port, "POST", "/api/v1/equipment/press-1/commands/reset", KEYS["operator"], {})
        assert_error(s, b, 403)
        s, b, _ = call(port, "POST", "/api/v1/equipment/press-1/commands/reset", KEYS["admin"], {})
        assert s == 200
        s, b, _ = call(
            port, "POST", "/api/v1/equipment/lathe-1/commands/set_speed", KEYS["operator"], {"parameters": {"value": 1}}
        )
        assert s == 409 and b["data"]["reason"] == "offline"
        s, b, _ = call(port, "POST", "/api/v1/equipment/press-1/commands/explode", KEYS["admin"], {})
        assert_error(s, b, 404)
        s, b, _ = call(port, "POST", "/api/v1/equipment/drill-9/commands/set_speed", KEYS["admin"], {})
        assert_error(s, b, 404)
        s, b, _ = call(port, "POST", cmd, KEYS["operator"], raw=b"{not json")
        assert_error(s, b, 400)
        s, b, _ = call(
            port, "POST", cmd, KEYS["operator"], raw=b'{"parameters": {"value": 1}, "pad": "' + b"x" * 4096 + b'"}'
        )
        assert_error(s, b, 413)
        # dead letters: without [mpm] there is no outbox; the admin routes still check roles first
        s, b, _ = call(port, "DELETE", "/api/v1/dead-letters/1", KEYS["operator"])
        assert_error(s, b, 403)
        s, b, _ = call(port, "POST", "/api/v1/dead-letters/1/retry", KEYS["admin"])
        assert_error(s, b, 404)
        # the driver got exactly the commands that passed; each attempt is audited with the key's name, never the key
        cmds = [json.loads(line)["command"] for line in Path(str(script) + ".commands.jsonl").read_text().splitlines()]
        assert cmds == ["set_speed", "set_speed", "refused", "reset"]
        audit = [e for e in daemon.logs() if e.get("event") == "command" and e.get("source") == "http"]
        assert {e["caller"] for e in audit} >= {"operator-key", "admin-key"}
        log_text = daemon.log_path.read_text()
        assert all(key not in log_text for key in KEYS.values())

        # metrics parse and move with traffic
        def counter(name: str) -> float:
            return metric_total(port, name)

        before = counter("edge_agent_commands_total")
        call(port, "POST", cmd, KEYS["operator"], {"parameters": {"value": 5}})
        assert counter("edge_agent_commands_total") == before + 1
        published = counter("edge_agent_mqtt_published_total")
        script_line(script, tag="temp", value=30.0)
        wait_until(lambda: counter("edge_agent_mqtt_published_total") > published)
        # edge-agent status prints the table
        out = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--url", f"http://127.0.0.1:{port}"],
            env={**daemon.env, "EDGE_AGENT_API_KEY": KEYS["viewer"]},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert "press-1" in out.stdout and "idle" in out.stdout and "lathe-1" in out.stdout and "offline" in out.stdout
        key_file = tmp_path / "viewer.key"
        key_file.write_text(KEYS["viewer"])
        out = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--url", f"http://127.0.0.1:{port}", "--key-file", str(key_file)],
            env=daemon.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0 and "press-1" in out.stdout
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--url", f"http://127.0.0.1:{port}"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "unreachable" in out.stderr


def test_healthz_turns_503_when_broker_down_too_long(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    cfg = write_config(tmp_path, broker.port, http=http_section(port))
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        wait_until(lambda: call(port, "GET", "/healthz")[0] == 200)
        broker.stop()
        _, b, _ = wait_until(lambda: (r := call(port, "GET", "/healthz"))[0] == 503 and r)
        assert b["components"]["mqtt"]["status"] == "down"
        broker.start()
        wait_until(lambda: call(port, "GET", "/healthz")[0] == 200)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_no_keys_reads_open_on_loopback_commands_403(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "s.jsonl"
    cfg = write_config(
        tmp_path, broker.port, scripted_equipment("m1", script), http=f'[http]\nlisten = "127.0.0.1:{port}"\n'
    )
    daemon = Daemon(cfg).start()
    try:
        daemon.wait_log("http_listening")
        s, b, _ = call(port, "GET", "/api/v1/equipment")
        assert s == 200 and b["equipment"][0]["equipment_id"] == "m1"
        s, b, _ = call(port, "POST", "/api/v1/equipment/m1/commands/set_speed", None, {"parameters": {"value": 1}})
        assert_error(s, b, 403)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_metrics_auth_needs_a_viewer_key(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    cfg = write_config(tmp_path, broker.port, http=http_section(port, "metrics_auth = true"))
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        s, b, _ = call(port, "GET", "/metrics")
        assert_error(s, b, 401)
        s, b, _ = call(port, "GET", "/metrics", "wrong-key")
        assert_error(s, b, 401)
        for key in KEYS.values():
            s, _, text = call(port, "GET", "/metrics", key)
            assert s == 200 and "edge_agent_mqtt_connected" in text
        assert call(port, "GET", "/healthz")[0] == 200  # health stays open
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_rate_limit_answers_429(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    cfg = write_config(tmp_path, broker.port, http=http_section(port, "rate_limit_per_minute = 5"))
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        codes = [call(port, "GET", "/api/v1/equipment", KEYS["viewer"])[0] for _ in range(8)]
        assert codes[:5] == [200] * 5 and 429 in codes[5:]
        s, b, _ = call(port, "GET", "/api/v1/equipment", KEYS["viewer"])
        assert_error(s, b, 429)
        # the limit is per key: another key still gets through
        assert call(port, "GET", "/api/v1/equipment", KEYS["admin"])[0] == 200
        assert daemon.stop() == 0
    finally:
        daemon.kill()

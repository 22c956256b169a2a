"""The local HTTP API against hostile input: bodies, headers, key guessing, slow and idle connections.

Every door answers bad input with a clear 4xx and stays open: never a 500, never a traceback in the log.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_http import ENV, KEYS, assert_error, call, http_section

from peers import GUARD_S, Broker, Daemon, free_port, scripted_equipment, wait_until, write_config

CMD = "/api/v1/equipment/press-1/commands/set_speed"


# -- a raw HTTP/1.1 client: urllib and http.client refuse to send the bytes these tests need


def request_bytes(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """One request as bytes, `Connection: close`, headers sent exactly as given."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def raw_call(port: int, data: bytes, source: str = "127.0.0.1") -> tuple[int, Any, dict[str, str]]:
    """Send raw request bytes, read the answer to the end: (status, JSON body or None, headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S, source_address=(source, 0)) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, payload = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        return status, json.loads(payload), headers
    except ValueError:
        return status, None, headers


def auth(role: str) -> tuple[bytes, bytes]:
    return (b"Authorization", f"Bearer {KEYS[role]}".encode())


JSON_TYPE = (b"Content-Type", b"application/json")


def nested(depth: int) -> bytes:
    """A command body nesting `depth` levels in all (at least 2)."""
    lists = depth - 2
    return b'{"parameters": {"value": ' + b"[" * lists + b"]" * lists + b"}}"


@pytest.fixture
def api(tmp_path: Path, broker: Broker) -> Iterator[tuple[Daemon, int, Path]]:
    """A daemon with one scripted press, keys for every role and a 256 KiB body limit."""
    port = free_port()
    script = tmp_path / "press.jsonl"
    script.write_text(json.dumps({"tag": "state", "value": 0}) + "\n")
    http = http_section(port).replace("max_body_bytes = 2048", "max_body_bytes = 262144")
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script), http=http)
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        wait_until(lambda: call(port, "GET", "/api/v1/equipment/press-1", KEYS["viewer"])[1].get("status") == "idle")
        yield daemon, port, script
    finally:
        daemon.kill()


def commands_run(script: Path) -> list[Any]:
    path = Path(str(script) + ".commands.jsonl")
    return [json.loads(line)["params"] for line in path.read_text().splitlines()] if path.exists() else []


def assert_quiet_log(daemon: Daemon) -> None:
    """No traceback and no handler crash in the daemon's log."""
    text = daemon.log_path.read_text(errors="replace")
    assert "Traceback" not in text and "http_handler_failed" not in text, text[-3000:]


def test_bad_bodies_get_400_or_413_naming_the_reason(api: tuple[Daemon, int, Path]) -> None:
    daemon, port, script = api
    op = [auth("operator"), JSON_TYPE]
    for depth in (65, 100_000):
        s, b, _ = raw_call(port, request_bytes("POST", CMD, op, nested(depth)))
        assert_error(s, b, 400)
        assert b["error"]["details"]["reason"] == "too_deep" and "64" in b["error"]["message"], b
    for body in (b"\xff\xfe{}", b'{"parameters": NaN}', b"{not json", b'{"parameters": {"value": 1}'):
        s, b, _ = raw_call(port, request_bytes("POST", CMD, op, body))
        assert_error(s, b, 400)
        assert b["error"]["details"]["reason"] == "malformed", (body, b)
    for body in (b"[1, 2]", b'{"parameters": [1]}', b'"text"'):
        s, b, _ = raw_call(port, request_bytes("POST", CMD, op, body))
        assert_error(s, b, 400)
    s, b, _ = raw_call(port, request_bytes("POST", CMD, op, b'{"parameters": {"value": "' + b"x" * 300_000 + b'"}}'))
    assert_error(s, b, 413)
    assert commands_run(script) == []
    # 64 levels are within the limit: the body reaches the command, which refuses a list as a value
    s, b, _ = raw_call(port, request_bytes("POST", CMD, op, nested(64)))
    assert s == 422 and b["success"] is False, b
    s, b, _ = raw_call(port, request_bytes("POST", CMD, op, b'{"parameters": {"value": 7}}'))
    assert s == 200 and b["success"] is True, b
    assert commands_run(script) == [{"value": 7}]
    assert_quiet_log(daemon)


def test_non_ascii_or_malformed_keys_are_401(api: tuple[Daemon, int, Path]) -> None:
    daemon, port, _ = api
    path = "/api/v1/equipment"
    for header in (
        (b"Authorization", b"Bearer \xff\xfe"),
        (b"Authorization", b"Bearer " + KEYS["viewer"].encode() + b"\xc3\xa9"),
        (b"X-API-Key", b"\xff"),
        (b"Authorization", b"Basic dXNlcjpwYXNz"),
        (b"Authorization", b"Bearer"),
        (b"Authorization", b"Bearer a b"),
    ):
        s, b, h = raw_call(port, request_bytes("GET", path, [header]))
        assert_error(s, b, 401)
        assert h["www-authenticate"] == "Bearer"
    # a request id that cannot be echoed is replaced by one that can
    s, _, h = raw_call(port, request_bytes("GET", path, [auth("viewer"), (b"X-Request-Id", b"\xff\xfe")]))
    assert s == 200 and h["x-request-id"].isascii() and h["x-request-id"].isprintable()
    s, _, h = raw_call(port, request_bytes("GET", path, [auth("viewer"), (b"X-Request-Id", b"trace-42")]))
    assert s == 200 and h["x-request-id"] == "trace-42"
    assert_quiet_log(daemon)


def test_commands_need_json_content_type(api: tuple[Daemon, int, Path]) -> None:
    _, port, script = api
    body = b'{"parameters": {"value": 5}}'
    for ctype in ([(b"Content-Type", b"text/plain")], [(b"Content-Type", b"application/x-www-form-urlencoded")], []):
        s, b, _ = raw_call(port, request_bytes("POST", CMD, [auth("operator"), *ctype], body))
        assert_error(s, b, 415)
    assert commands_run(script) == []
    utf8 = (b"Content-Type", b"application/json; charset=utf-8")
    s, b, _ = raw_call(port, request_bytes("POST", CMD, [auth("operator"), utf8], body))
    assert s == 200 and b["success"] is True, b
    assert commands_run(script) == [{"value": 5}]


def test_dead_letters_are_admin_only(api: tuple[Daemon, int, Path]) -> None:
    _, port, _ = api
    for role in ("viewer", "operator"):
        for method, path in (
            ("GET", "/api/v1/dead-letters"),
            ("POST", "/api/v1/dead-letters/1/retry"),
            ("DELETE", "/api/v1/dead-letters/1"),
        ):
            s, b, _ = call(port, method, path, KEYS[role])
            assert_error(s, b, 403)
    s, b, _ = call(port, "GET", "/api/v1/dead-letters", KEYS["admin"])
    assert s == 200 and b == {"dead_letters": []}


def keyed_get(conn: http.client.HTTPConnection, key: str) -> tuple[int, str | None]:
    conn.request("GET", "/api/v1/equipment", headers={"Authorization": f"Bearer {key}"})
    resp = conn.getresponse()
    resp.read()
    return resp.status, resp.getheader("Retry-After")


def test_key_guessing_is_throttled_per_address(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    cfg = write_config(tmp_path, broker.port, http=http_section(port, "rate_limit_per_minute = 3"))
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        # the viewer key spends its rate limit first: that bucket must survive the guessing below
        codes = [call(port, "GET", "/api/v1/equipment", KEYS["viewer"])[0] for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        # 2,000 different wrong keys from one address: 10 answered 401, then 429 with Retry-After
        guesser = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD_S, source_address=("127.0.0.2", 0))
        answers = [keyed_get(guesser, f"guess-{i}") for i in range(2000)]
        assert [s for s, _ in answers[:10]] == [401] * 10
        assert {s for s, _ in answers[10:]} == {429}
        assert all(ra is not None and 1 <= int(ra) <= 60 for _, ra in answers[10:])
        # a throttled address is refused even with a right key, until its window has passed
        assert keyed_get(guesser, KEYS["admin"])[0] == 429
        s, b, _ = raw_call(port, request_bytes("GET", "/api/v1/equipment", [auth("admin")]), source="127.0.0.2")
        assert_error(s, b, 429)
        guesser.close()
        # 2,000 more wrong keys from 200 other addresses, 10 each: every one a 401, each address at its limit
        for host in range(10, 210):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD_S, source_address=(f"127.0.0.{host}", 0))
            assert [keyed_get(conn, f"k-{host}-{i}")[0] for i in range(10)] == [401] * 10
            conn.close()
        s, _, _ = raw_call(port, request_bytes("GET", "/api/v1/equipment", [auth("admin")]), source="127.0.0.10")
        assert s == 429
        # nobody was forgiven and nobody else was punished: the viewer key is still limited, the
        # admin key from the loopback address still gets through
        assert call(port, "GET", "/api/v1/equipment", KEYS["viewer"])[0] == 429
        assert call(port, "GET", "/api/v1/equipment", KEYS["admin"])[0] == 200
        assert call(port, "GET", "/healthz")[0] == 200
        throttled = [e for e in daemon.logs() if e.get("event") == "http_auth_throttled"]
        assert len(throttled) == 201 and all(e["address"].startswith("127.0.0.") for e in throttled)
        assert_quiet_log(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a close)."""
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_slow_and_idle_connections_are_closed(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    http = http_section(port, "header_timeout_s = 1.0\nidle_timeout_s = 2.0")
    script = tmp_path / "press.jsonl"
    script.write_text(json.dumps({"tag": "state", "value": 0}) + "\n")
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script), http=http)
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        # headers sent one byte at a time, one every 0.2 s: 2,000 bytes would take 400 s; closed long before
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
            head = b"GET /api/v1/equipment HTTP/1.1\r\nX-Pad: " + b"p" * 2000 + b"\r\n\r\n"
            assert trickle(sock, head, 0.2) < len(head)
        # a command body that stops half-way is answered 408 once the idle timeout has passed
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
            body = b'{"parameters": {"value": 5}}'
            sock.sendall(request_bytes("POST", CMD, [auth("operator"), JSON_TYPE], body)[:-10])
            answer = b""
            while b"}}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer, answer
        # a connection that sends nothing is closed without an answer
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
            assert read_until_closed(sock) == b""
        # a kept-alive connection is closed once idle, after a complete answer
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
        assert call(port, "GET", "/healthz")[0] == 200
        assert_quiet_log(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def trickle(sock: socket.socket, data: bytes, every_s: float) -> int:
    """Send `data` one byte every `every_s` until the server closes; the bytes sent by then."""
    for sent, byte in enumerate(data):
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return sent
        if select.select([sock], [], [], every_s)[0]:
            assert read_until_closed(sock) == b"", "the server answered a request it never fully got"
            return sent + 1
    return len(data)


def test_connections_beyond_the_cap_are_refused_and_logged_once(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    http = http_section(port, "max_connections = 4\nheader_timeout_s = 60.0")
    cfg = write_config(tmp_path, broker.port, http=http)
    daemon = Daemon(cfg, env=ENV).start()
    held: list[socket.socket] = []
    try:
        daemon.wait_log("http_listening", max_connections=4)
        held = [socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) for _ in range(4)]
        wait_until(lambda: daemon_connections(daemon, port) == 4, what="four connections held")
        for _ in range(50):  # each is closed at once, without an answer, not queued
            with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
                with contextlib.suppress(OSError):  # it may be closed already
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_until_closed(sock) == b""
        for sock in held:
            sock.close()
        held = []
        # served again; the end of the limit is logged once a quarter of the house has left
        restored = wait_until(
            lambda: healthy(port) and [e for e in daemon.logs() if e.get("event") == "http_accept_restored"],
            what="served again and the limit's end logged",
        )
        assert len(restored) == 1 and restored[0]["refused"] >= 50, restored
        limited = [e for e in daemon.logs() if e.get("event") == "http_accept_limited"]
        assert len(limited) == 1 and limited[0]["reason"] == "max_connections", limited
        assert_quiet_log(daemon)
        assert daemon.stop() == 0
    finally:
        for sock in held:
            sock.close()
        daemon.kill()


def healthy(port: int) -> bool:
    """/healthz answers 200 (a connection refused while the daemon is still full counts as no)."""
    try:
        return call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def daemon_connections(daemon: Daemon, port: int) -> int:
    """Established connections the daemon holds on its API port."""
    import psutil

    assert daemon.proc is not None
    conns = psutil.Process(daemon.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


# -- property-based fuzzing against the running API: never a 500, always a clear 4xx or the right answer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["parameters", "x", ""]), json_values, max_size=3).map(
        lambda v: json.dumps(v).encode()
    ),
    json_values.map(lambda v: json.dumps({"parameters": {"value": v}}).encode()),
    st.integers(min_value=2, max_value=400).map(nested),
    st.sampled_from([b"NaN", b"[Infinity]", b'{"a": -Infinity}', b'"\\ud800"', b"\xef\xbb\xbf{}", b"{}" * 3]),
)
# header values as a hostile client could send them: any byte but CR, LF and NUL
header_values = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
header_names = st.sampled_from(
    [b"Authorization", b"X-API-Key", b"Content-Type", b"X-Request-Id", b"Content-Encoding", b"Accept", b"X-Other"]
)


def assert_clear(status: int, body: Any, allowed: set[int]) -> None:
    assert status in allowed, (status, body)
    if status >= 400 and status not in (409, 422) and body is not None:
        assert set(body["error"]) == {"code", "message", "category", "details", "timestamp", "request_id"}, body


def test_fuzzed_bodies_and_headers_never_crash(tmp_path: Path, broker: Broker) -> None:
    port = free_port()
    script = tmp_path / "press.jsonl"
    script.write_text(json.dumps({"tag": "state", "value": 0}) + "\n")
    # throttles out of the way, so that every example reaches the parsing it is meant to fuzz
    http = http_section(port, "rate_limit_per_minute = 1000000\nauth_failures_per_minute = 1000000")
    cfg = write_config(tmp_path, broker.port, scripted_equipment("press-1", script), http=http)
    daemon = Daemon(cfg, env=ENV).start()
    try:
        daemon.wait_log("http_listening")
        wait_until(lambda: call(port, "GET", "/api/v1/equipment/press-1", KEYS["viewer"])[1].get("status") == "idle")

        @given(body=bodies)
        def bodies_to_a_command(body: bytes) -> None:
            s, b, _ = raw_call(port, request_bytes("POST", CMD, [auth("operator"), JSON_TYPE], body))
            assert_clear(s, b, {200, 400, 409, 413, 422})
            if s in (200, 409, 422):
                assert isinstance(b["success"], bool) and b["request_id"], b

        @given(headers=st.lists(st.tuples(header_names, header_values), max_size=4), body=bodies)
        def headers_to_every_route(headers: list[tuple[bytes, bytes]], body: bytes) -> None:
            s, b, _ = raw_call(port, request_bytes("POST", CMD, headers, body))
            assert_clear(s, b, {400, 401, 403, 413, 415})
            s, b, _ = raw_call(port, request_bytes("GET", "/api/v1/equipment", headers))
            assert_clear(s, b, {200, 400, 401})
            s, b, _ = raw_call(port, request_bytes("GET", "/api/v1/dead-letters", [*headers, auth("viewer")]))
            assert_clear(s, b, {400, 401, 403})

        bodies_to_a_command()
        headers_to_every_route()
        assert call(port, "GET", "/healthz")[0] == 200
        assert_quiet_log(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


def test_throttle_tables_drop_the_least_recently_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound on remembered addresses and callers drops one entry at a time, never the whole table."""
    import agent.http

    monkeypatch.setattr(agent.http, "TABLE_SIZE", 3)
    table: agent.http._Lru[int] = agent.http._Lru()
    for name in ("a", "b", "c"):
        table.touch(name, lambda: 0)
    table["a"] = 7
    table.touch("a", lambda: 0)  # seen again: now the most recent
    table.touch("d", lambda: 0)
    assert list(table) == ["c", "a", "d"]
    assert table["a"] == 7

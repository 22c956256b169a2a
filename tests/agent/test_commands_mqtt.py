"""The command router's MQTT side in-process, with a real store and the scripted driver: every request,
however hostile its payload, gets exactly one result and never an exception out of its task."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import event, given
from hypothesis import strategies as st

import scripted_driver
from agent import jsonin
from agent.commands import MAX_REQUEST_BYTES, CommandRouter, response_topic_problem, sent_at_problem
from agent.config import AgentConfig, parse_config
from agent.mqtt import Incoming
from agent.store import Store, StoredMessage
from drivers.base import Driver, DriverContext
from peers import scripted_equipment

MAX_AGE_S = 30.0


class Harness:
    """A router over a real store, press-1 idle behind a scripted driver."""

    def __init__(self, folder: Path) -> None:
        text = f'[agent]\nid = "cell-f"\nsite = "fuzz"\nstate_dir = "{folder / "state"}"\n'
        text += scripted_equipment("press-1", folder / "press.jsonl")
        self.cfg: AgentConfig = parse_config(text, folder / "agent.toml")
        self.root = self.cfg.root_topic
        self.store = Store(folder / "state")
        self.store.open()
        ctx = DriverContext(folder / "state")
        self.driver = scripted_driver.ScriptedDriver(self.cfg.equipment[0], ctx)
        self.driver_of: Callable[[str], Driver | None] = {"press-1": self.driver}.get

    def router(self) -> CommandRouter:
        return CommandRouter(self.cfg, self.store, {"press-1": "idle"}.get, self.driver_of)

    def topic(self, eid: str = "press-1", name: str = "set_speed") -> str:
        return f"{self.root}/equipment/{eid}/cmd/{name}"

    async def ask(
        self, router: CommandRouter, messages: list[Incoming]
    ) -> tuple[list[StoredMessage], list[dict[str, Any]]]:
        """Hand `messages` to the router through its MQTT entry point; return what it stored and logged."""
        after = self.store.max_id()
        with structlog.testing.capture_logs() as logs:
            tasks = []
            for msg in messages:
                router.handle_mqtt(msg)
                tasks.extend(t for t in router._tasks if t not in tasks)
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:
            assert t.exception() is None, repr(t.exception())
        return self.store.fetch(after, 1000), logs


def incoming(
    topic: str,
    payload: bytes | dict[str, Any],
    *,
    retain: bool = False,
    response_topic: str | None = None,
    correlation: bytes | None = None,
    expiry_s: int | None = None,
) -> Incoming:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Incoming(topic, data, retain, response_topic, correlation, expiry_s, time.time())


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    with tempfile.TemporaryDirectory(prefix="cmd-fuzz-") as folder:
        h = Harness(Path(folder))
        yield h
        h.store.close()


def one_result(stored: list[StoredMessage], topic: str) -> dict[str, Any]:
    assert len(stored) == 1, [m.topic for m in stored]
    assert stored[0].topic == f"{topic}/result" and stored[0].kind == "result"
    body = json.loads(stored[0].payload)
    assert isinstance(body["success"], bool) and isinstance(body["message"], str)
    assert isinstance(body["data"], dict) and ("reason" in body["data"] or body["success"])
    return body


# ---- the rules, one by one ------------------------------------------------------------------------


def test_gate_refusals_carry_the_reason(harness: Harness) -> None:
    topic = harness.topic()
    cases = [
        (b'{"request_id": "d", "parameters": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "too_deep"),
        (json.dumps({"request_id": "big", "pad": "x" * MAX_REQUEST_BYTES}).encode(), "too_large"),
        (b'{"request_id": "\xff"}', "malformed"),
        (b'{"request_id": "n", "parameters": {"value": NaN}}', "malformed"),
        (b"[1, 2]", "malformed"),
        (b"", "malformed"),
    ]
    for payload, reason in cases:
        stored, logs = asyncio.run(harness.ask(harness.router(), [incoming(topic, payload)]))
        body = one_result(stored, topic)
        assert body["success"] is False and body["data"]["reason"] == reason, (payload[:40], body)
        assert body["request_id"] is None
        assert [e["reason"] for e in logs if e["event"] == "command"] == [reason]


def test_sent_at_rules() -> None:
    now = time.time()
    iso = lambda dt: dt.isoformat()  # noqa: E731
    at = datetime.fromtimestamp(now, UTC)
    assert sent_at_problem(None, MAX_AGE_S, now) is None
    assert sent_at_problem(iso(at - timedelta(seconds=29)), MAX_AGE_S, now) is None
    assert sent_at_problem(iso(at + timedelta(seconds=29)), MAX_AGE_S, now) is None
    assert sent_at_problem(iso(at - timedelta(seconds=31)), MAX_AGE_S, now)[1] == "expired"  # type: ignore[index]
    skew = sent_at_problem("2999-01-01T00:00:00Z", MAX_AGE_S, now)
    assert skew is not None and skew[1] == "clock_skew" and "command_max_age_s (30 s)" in skew[0]
    assert sent_at_problem(iso(at + timedelta(seconds=31)), MAX_AGE_S, now)[1] == "clock_skew"  # type: ignore[index]
    for bad in ("yesterday", "", 1733400000, True, ["2026-01-01"], {"t": 1}, "2026-13-01T00:00:00Z", "x" * 5000):
        problem = sent_at_problem(bad, MAX_AGE_S, now)
        assert problem is not None and problem[1] == "malformed" and len(problem[0]) < 200, bad
    for extreme in ("0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59.999999-23:59"):
        assert sent_at_problem(extreme, MAX_AGE_S, now) is not None


def test_response_topic_rules(harness: Harness) -> None:
    root = harness.root
    for bad, why in [
        ("", "empty"),
        ("replies/+", "wildcard"),
        ("replies/#", "wildcard"),
        ("a\0b", "NUL"),
        (root, "own topic root"),
        (f"{root}/equipment/press-1/status", "own topic root"),
        (f"{root}/equipment/press-1/cmd/set_speed/result", "own topic root"),
        ("replies/\udc80", "UTF-8"),
        ("r" * 65536, "65535"),
    ]:
        assert why in (response_topic_problem(bad, root) or ""), bad
    for good in (None, "replies/hmi-1", f"{root}x/status", "edge/fuzz", "$share-like/x"):
        assert response_topic_problem(good, root) is None, good


def test_refused_response_topic_still_answers_on_the_result_topic(harness: Harness) -> None:
    topic = harness.topic()
    status = f"{harness.root}/equipment/press-1/status"
    for reply in (status, "replies/#", ""):
        # a request that runs, and one refused at the gate: both answered on .../result only, logged once
        msgs = [
            incoming(topic, {"request_id": f"ok-{reply}", "parameters": {"value": 5}}, response_topic=reply),
            incoming(topic, b"{broken", response_topic=reply, correlation=b"c1"),
        ]
        stored, logs = asyncio.run(harness.ask(harness.router(), msgs))
        assert len(stored) == 2 and all(m.response_topic is None for m in stored)
        assert {m.topic for m in stored} == {f"{topic}/result"}
        bodies = sorted((json.loads(m.payload) for m in stored), key=lambda b: b["request_id"] is None)
        assert bodies[0]["success"] is True and bodies[1]["data"]["reason"] == "malformed"
        refused = [e for e in logs if e["event"] == "command_response_topic_refused"]
        assert len(refused) == 2 and {e["response_topic"] for e in refused} == {reply}
    # a foreign topic is used, with the correlation data
    stored, _ = asyncio.run(
        harness.ask(
            harness.router(),
            [incoming(topic, {"request_id": "fine", "parameters": {}}, response_topic="replies/x", correlation=b"k")],
        )
    )
    assert (stored[0].response_topic, stored[0].correlation) == ("replies/x", b"k")


def test_clock_skew_is_refused_before_running(harness: Harness) -> None:
    topic = harness.topic()
    script = Path(str(harness.driver.conn.script) + ".commands.jsonl")
    before = script.read_text() if script.exists() else ""
    req = {"request_id": "future", "parameters": {"value": 1}, "sent_at": "2999-01-01T00:00:00Z"}
    stored, _ = asyncio.run(harness.ask(harness.router(), [incoming(topic, req)]))
    body = one_result(stored, topic)
    assert body["data"]["reason"] == "clock_skew" and body["request_id"] == "future"
    assert (script.read_text() if script.exists() else "") == before


def test_a_fault_costs_only_its_own_request(harness: Harness) -> None:
    topic = harness.topic()
    calls = 0

    def faulty(eid: str) -> Driver | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("a bug")
        return harness.driver

    router = CommandRouter(harness.cfg, harness.store, {"press-1": "idle"}.get, faulty)

    async def scenario() -> tuple[list[StoredMessage], list[dict[str, Any]], list[StoredMessage]]:
        # the faulty request and a duplicate of it; then another request
        req = {"request_id": "boom", "parameters": {"value": 1}}
        stored, logs = await harness.ask(router, [incoming(topic, req), incoming(topic, req)])
        after, _ = await harness.ask(router, [incoming(topic, {"request_id": "next", "parameters": {"value": 2}})])
        return stored, logs, after

    stored, logs, after = asyncio.run(scenario())
    bodies = [json.loads(m.payload) for m in stored]
    assert len(bodies) == 2 and all(b["data"] == {"reason": "internal"} and b["success"] is False for b in bodies)
    assert bodies[0]["request_id"] == bodies[1]["request_id"] == "boom"
    faults = [e for e in logs if e.get("reason") == "internal"]
    assert len(faults) == 1 and faults[0]["equipment_id"] == "press-1" and faults[0]["command"] == "set_speed"
    assert faults[0]["log_level"] == "error" and isinstance(faults[0]["exc_info"], KeyError)
    assert json.loads(after[0].payload)["success"] is True


def test_a_failing_store_costs_only_its_own_request(harness: Harness) -> None:
    topic = harness.topic()

    class BrokenSink:
        def __init__(self) -> None:
            self.fail = True

        def append(self, *args: Any, **kw: Any) -> int:
            if self.fail:
                raise OSError("disk gone")
            return harness.store.append(*args, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(harness.store, name)

    sink = BrokenSink()
    router = CommandRouter(harness.cfg, sink, {"press-1": "idle"}.get, harness.driver_of)  # type: ignore[arg-type]
    _, logs = asyncio.run(harness.ask(router, [incoming(topic, {"request_id": "lost", "parameters": {"value": 1}})]))
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["command", "command_result_lost"]
    sink.fail = False
    stored, _ = asyncio.run(harness.ask(router, [incoming(topic, {"request_id": "kept", "parameters": {"value": 1}})]))
    assert one_result(stored, topic)["success"] is True


# ---- fuzz ---------------------------------------------------------------------------------------------

ROUTES = [("press-1", "set_speed"), ("press-1", "reset"), ("press-1", "refused"), ("press-1", "nope"), ("x", "y")]

# Text that JSON can carry but UTF-8 cannot (lone surrogates), and huge or odd numbers.
texts = st.text(max_size=20) | st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from('a\x00[{"\\\u00e9'), max_size=8
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(0, 4000).map(lambda n: -(10**n))
    | st.floats(allow_nan=False)
    | texts
)
documents = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(texts, c, max_size=4), max_leaves=20
)


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A document wrapped in up to 80 levels of lists and objects (the limit is 64)."""
    doc = draw(documents)
    for wrap in draw(st.lists(st.booleans(), max_size=80)):
        doc = [doc] if wrap else {"a": doc}
    return doc


def encode(doc: Any, how: str) -> bytes:
    if how == "ascii":
        return json.dumps(doc).encode()
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")  # lone surrogates: not UTF-8


near_now = st.floats(-100, 100).map(lambda s: (datetime.now(UTC) + timedelta(seconds=s)).isoformat())
sent_ats = (
    near_now | st.none() | texts | documents | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
)
response_topics = st.none() | texts | st.sampled_from(["replies/a", "replies/#", "", "$ROOT", "$ROOT/equipment/x"])


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    # mostly present: a request should often get past the first checks
    likely = st.sampled_from([True, True, True, False])
    req: dict[str, Any] = {}
    if draw(likely):
        req["request_id"] = draw(st.text(min_size=1, max_size=10) if draw(likely) else documents)
    if draw(likely):
        req["parameters"] = draw(st.fixed_dictionaries({"value": scalars}) | nested())
    if not draw(likely):
        req["sent_at"] = draw(sent_ats)
    req.update(draw(st.dictionaries(texts, documents, max_size=2)))
    return req


def echoed_id(payload: bytes) -> str | None:
    """The request_id a result echoes: only one from a payload that passed the gate as an object."""
    try:
        request = jsonin.loads(payload, max_bytes=MAX_REQUEST_BYTES)
    except jsonin.InputError:
        return None
    rid = request.get("request_id") if isinstance(request, dict) else None
    return rid if isinstance(rid, str) and rid else None


def check_one(harness: Harness, route: tuple[str, str], msg: Incoming) -> None:
    stored, logs = asyncio.run(harness.ask(harness.router(), [msg]))
    body = one_result(stored, harness.topic(*route))
    assert body["request_id"] == echoed_id(msg.payload)
    assert len([e for e in logs if e["event"] == "command"]) == 1
    event(str(body["data"].get("reason", "ok")))
    used = stored[0].response_topic
    assert used is None or (used == msg.response_topic and response_topic_problem(used, harness.root) is None)


@given(route=st.sampled_from(ROUTES), payload=st.binary(max_size=200), retain=st.booleans())
def test_fuzz_any_bytes_get_one_result(harness: Harness, route: tuple[str, str], payload: bytes, retain: bool) -> None:
    check_one(harness, route, incoming(harness.topic(*route), payload, retain=retain))


@given(
    route=st.sampled_from(ROUTES),
    request=requests() | nested(),
    how=st.sampled_from(["ascii", "ascii", "ascii", "raw"]),
    reply=response_topics,
    expiry=st.none() | st.integers(min_value=0, max_value=10),
)
def test_fuzz_any_json_gets_one_result(
    harness: Harness, route: tuple[str, str], request: Any, how: str, reply: str | None, expiry: int | None
) -> None:
    if reply is not None:
        reply = reply.replace("$ROOT", harness.root)
    msg = incoming(harness.topic(*route), encode(request, how), response_topic=reply, correlation=b"c", expiry_s=expiry)
    check_one(harness, route, msg)

"""The one command router: MQTT command topics and the HTTP API both come through here.

Only declared commands run; the driver that owns a command kind validates its parameters; the
equipment's current state must allow the command; MQTT requests are refused when retained, too old or
expired, and a `request_id` seen in the last 10 minutes gets its first result again instead of running
twice. Every attempt is logged with its outcome.

An MQTT request passes the outside-JSON gate (`agent.jsonin`: size, UTF-8, nesting) first; a `sent_at`
more than `command_max_age_s` ahead is refused as `clock_skew`; an MQTT 5 response topic under the
agent's own root (or empty, or with wildcards) is not used. Every request gets exactly one result: a
fault while handling one is answered `internal` and costs that request only.

A caller with a role (the HTTP API passes its key's) is refused before anything runs when the role is
below the command's `role`; MQTT and the Python API are trusted callers and pass none. The pure rules
(roles, `sent_at`, response topics, `load_process` parameters) are in `agent.command_rules`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent import jsonin, metrics
from agent.command_rules import check_role, loggable, response_topic_problem, sent_at_problem, validate_load_process
from agent.config import AgentConfig, CommandBase, EquipmentConfig, Role
from agent.errors import CommandError, RejectedError, TransientError
from agent.model import CommandResult, iso, json_safe, utcnow
from agent.monitor import Sink
from agent.mqtt import Incoming
from agent.topics import topics_for
from drivers.sdk.driver import Driver
from drivers.sdk.registry import get_driver

log = structlog.get_logger("edge_agent.commands")

DEDUP_WINDOW_S = 600.0
MAX_REQUEST_BYTES = 64 * 1024  # an MQTT command request; larger ones are refused (too_large)
COMMAND_TIMEOUT_S = 60.0
BUSY = ("running", "paused")
ParameterSource = Callable[[str], Awaitable[dict[str, Any]]]


class CommandRouter:
    """Checks and runs commands, and publishes their results."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Sink,
        status_of: Callable[[str], str | None],
        driver_of: Callable[[str], Driver | None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._status_of = status_of
        self._driver_of = driver_of
        self.parameter_source: ParameterSource | None = None
        self._seen: OrderedDict[str, tuple[float, asyncio.Future[dict[str, Any]]]] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()

    def set_parameter_source(self, source: ParameterSource) -> Callable[[], None]:
        """Where `load_process` reads a process's parameters (MPM); returns the call that removes it."""
        self.parameter_source = source

        def remove() -> None:
            if self.parameter_source is source:
                self.parameter_source = None

        return remove

    # -- the shared entry point

    async def execute(
        self, eid: str, name: str, params: Any, *, source: str, caller: str | None = None, role: Role | None = None
    ) -> tuple[dict[str, Any], int]:
        """Run one command; return the result body and the HTTP status it maps to.

        With a `role`, `authorize` runs first and its refusals are raised, not returned: they are the
        caller's access problem, not a command's outcome, and are neither audited nor counted as one.
        """
        if role is not None:
            self.authorize(eid, name, role)
        started = time.monotonic()
        try:
            result = await self._run(eid, name, params)
            status = 200 if result.success else 422
            reason = None if result.success else "refused"
            if not result.success:
                result.data.setdefault("reason", "refused")
        except CommandError as err:
            result = CommandResult(False, str(err), {"reason": err.reason})
            status = err.http_status
            reason = err.reason
        except (TransientError, RejectedError) as err:
            result = CommandResult(False, f"MPM did not answer as needed: {err}", {"reason": "mpm_unavailable"})
            status = 409
            reason = "mpm_unavailable"
        except (ConnectionError, OSError, TimeoutError) as err:
            result = CommandResult(
                False,
                f"equipment {eid!r} did not take the command: {err or type(err).__name__}",
                {"reason": "unavailable"},
            )
            status = 409
            reason = "unavailable"
        body = {
            "success": result.success,
            "message": result.message,
            "data": json_safe(result.data),
            "timestamp": iso(utcnow()),
        }
        metrics.COMMANDS.labels(*self._labels(eid, name), "ok" if result.success else reason or "failed").inc()
        log.info(
            "command",
            equipment_id=eid,
            command=name,
            source=source,
            caller=caller,
            parameters=loggable(params),
            success=result.success,
            reason=reason,
            message=result.message,
            duration_s=round(time.monotonic() - started, 3),
        )
        return body, status

    def authorize(self, eid: str, name: str, role: Role) -> None:
        """Refuse a caller whose `role` is below the command's: `Forbidden` (403). Unknown equipment or
        commands are refused first, as `CommandError` 404, as running them would be."""
        check_role(role, self._declared(eid, name)[1].role)

    def _declared(self, eid: str, name: str) -> tuple[EquipmentConfig, CommandBase]:
        eq = self._equipment(eid)
        if eq is None:
            raise CommandError(f"unknown equipment {eid!r}", "unknown_equipment", 404)
        cmd = eq.command(name)
        if cmd is None:
            raise CommandError(f"command {name!r} is not declared for equipment {eid!r}", "unknown_command", 404)
        return eq, cmd

    async def _run(self, eid: str, name: str, params: Any) -> CommandResult:
        eq, cmd = self._declared(eid, name)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise CommandError(f"command {name!r}: parameters must be an object", "bad_parameters")
        driver_cls = get_driver(eq.driver)
        if cmd.kind == "load_process":
            checked = validate_load_process(cmd, params)
        else:
            checked = driver_cls.validate_command(eq, cmd, params)
        self._check_state(eq, cmd)
        driver = self._driver_of(eid)
        if driver is None:
            raise CommandError(f"equipment {eid!r} is offline", "offline", 409)
        if cmd.kind == "load_process":
            return await self._load_process(eq, driver, checked["process_id"])
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            return await driver.send_command(cmd, checked)

    def _equipment(self, eid: str) -> EquipmentConfig | None:
        for eq in self.cfg.equipment:
            if eq.id == eid:
                return eq
        return None

    def _check_state(self, eq: EquipmentConfig, cmd: CommandBase) -> None:
        status = self._status_of(eq.id) or "offline"
        if status == "offline":
            raise CommandError(f"equipment {eq.id!r} is offline", "offline", 409)
        if status == "error" and cmd.kind != "reset":
            raise CommandError(f"equipment {eq.id!r} is in error: only reset may run", "state", 409)
        if cmd.kind in ("load_process", "start_print") and status in BUSY:
            raise CommandError(
                f"equipment {eq.id!r} is {status}: {cmd.name!r} is refused until it is idle", "busy", 409
            )

    async def _load_process(self, eq: EquipmentConfig, driver: Driver, process_id: str) -> CommandResult:
        if self.parameter_source is None:
            raise CommandError("load_process needs [mpm] to be configured", "mpm_disabled", 409)
        try:
            values = await self.parameter_source(process_id)
        except ValueError as err:
            raise CommandError(f"process {process_id!r} is unknown to MPM", "unknown_process") from err
        driver_cls = get_driver(eq.driver)
        plan: list[tuple[str, CommandBase, dict[str, Any]]] = []
        skipped = []
        # Every value is checked before any is written: a load is all or nothing at validation.
        for param, cmd_name in eq.parameters.items():
            if param not in values:
                skipped.append(param)
                continue
            wcmd = eq.command(cmd_name)
            assert wcmd is not None
            try:
                checked = driver_cls.validate_command(eq, wcmd, {"value": values[param]})
            except CommandError as err:
                raise CommandError(f"parameter {param!r} of process {process_id!r}: {err}", err.reason) from err
            plan.append((param, wcmd, checked))
        written: list[dict[str, Any]] = []
        for param, wcmd, checked in plan:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                res = await driver.send_command(wcmd, checked)
            if not res.success:
                return CommandResult(
                    False,
                    f"writing parameter {param!r} failed: {res.message}",
                    {"process_id": process_id, "written": written, "failed": param},
                )
            written.append({"parameter": param, "command": wcmd.name, "value": checked["value"]})
        return CommandResult(
            True,
            f"loaded {len(written)} parameter(s) of process {process_id}",
            {"process_id": process_id, "written": written, "skipped": skipped},
        )

    # -- MQTT

    def handle_mqtt(self, msg: Incoming) -> None:
        """Take a request from `R/equipment/{eid}/cmd/{command}` (runs it in a task)."""
        task = asyncio.get_running_loop().create_task(self._handle_mqtt(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle_mqtt(self, msg: Incoming) -> None:
        topics = topics_for(self.cfg)
        target = topics.parse_command(msg.topic)
        if target is None:
            log.warning("command_topic_unknown", topic=msg.topic)
            return
        req = _Request(target[0], target[1], msg, response_topic_problem(msg.response_topic, topics.root))
        try:
            await self._serve_mqtt(req)
        except Exception as err:
            # A bug or a failing store costs this request only: it is answered, the router goes on.
            self._answer_internal(req, err)
        except BaseException:
            if req.first is not None and not req.first.done():
                req.first.cancel()  # shutting down: a waiting duplicate stops too
            raise

    async def _serve_mqtt(self, req: _Request) -> None:
        try:
            request = jsonin.loads(req.msg.payload, max_bytes=MAX_REQUEST_BYTES, what="command request")
        except jsonin.InputError as err:
            self._refuse(req, str(err), err.reason)
            return
        if not isinstance(request, dict):
            self._refuse(req, "malformed request: not a JSON object", "malformed")
            return
        request_id = request.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            self._refuse(req, "request_id is required (a non-empty string)", "malformed")
            return
        req.request_id = request_id
        if req.msg.retain:
            self._refuse(req, "expired: a retained request is never run", "expired")
            return
        problem = sent_at_problem(request.get("sent_at"), self.cfg.mqtt.command_max_age_s, time.time())
        if problem is not None:
            self._refuse(req, *problem)
            return
        if req.msg.expiry_s is not None and req.msg.expiry_s <= 0:
            self._refuse(req, "expired: message expiry passed", "expired")
            return
        key = f"{req.eid}/{req.name}/{request_id}"
        self._expire_seen()
        seen = self._seen.get(key)
        if seen is not None:
            first = await asyncio.shield(seen[1])
            log.info("command_duplicate", equipment_id=req.eid, command=req.name, request_id=request_id)
            self._publish(req, dict(first))
            return
        req.first = asyncio.get_running_loop().create_future()
        self._seen[key] = (time.monotonic(), req.first)
        body, _ = await self.execute(req.eid, req.name, request.get("parameters"), source="mqtt", caller=request_id)
        result = {"request_id": request_id, **body}
        req.first.set_result(result)
        self._publish(req, dict(result))

    def _answer_internal(self, req: _Request, err: Exception) -> None:
        body = self._refusal(req, f"internal error while handling the request: {type(err).__name__}", "internal", err)
        if req.first is not None and not req.first.done():
            req.first.set_result(body)  # a duplicate gets this answer again rather than a second run
        try:
            self._publish(req, dict(body))
        except Exception as publish_err:
            log.error(
                "command_result_lost",
                equipment_id=req.eid,
                command=req.name,
                request_id=req.request_id,
                error=f"{type(publish_err).__name__}: {publish_err}",
            )

    def _expire_seen(self) -> None:
        cutoff = time.monotonic() - DEDUP_WINDOW_S
        while self._seen:
            _, (at, _) = next(iter(self._seen.items()))
            if at >= cutoff:
                break
            self._seen.popitem(last=False)

    def _refuse(self, req: _Request, message: str, reason: str) -> None:
        self._publish(req, self._refusal(req, message, reason))

    def _refusal(self, req: _Request, message: str, reason: str, err: Exception | None = None) -> dict[str, Any]:
        """Log a request that did not run (with the traceback when `err` is a fault) and build its result."""
        (log.error if err is not None else log.info)(
            "command",
            equipment_id=req.eid,
            command=req.name,
            source="mqtt",
            caller=req.request_id,
            success=False,
            reason=reason,
            message=message,
            exc_info=err,
        )
        metrics.COMMANDS.labels(*self._labels(req.eid, req.name), reason).inc()
        return {
            "request_id": req.request_id,
            "success": False,
            "message": message,
            "data": {"reason": reason},
            "timestamp": iso(utcnow()),
        }

    def _labels(self, eid: str, name: str) -> tuple[str, str]:
        """Metric labels: names from outside that match nothing configured share one label, so that
        requests on made-up topics cannot grow the metrics without bound."""
        eq = self._equipment(eid)
        if eq is None:
            return "_unknown", "_unknown"
        return eid, name if eq.command(name) is not None else "_unknown"

    def _publish(self, req: _Request, body: dict[str, Any]) -> None:
        topic = topics_for(self.cfg).command_result(req.eid, req.name)
        reply_to = req.msg.response_topic
        if req.reply_problem is not None:
            reply_to = None
            if not req.reply_logged:
                req.reply_logged = True
                log.warning(
                    "command_response_topic_refused",
                    equipment_id=req.eid,
                    command=req.name,
                    request_id=req.request_id,
                    response_topic=req.msg.response_topic,
                    why=req.reply_problem,
                )
        self.store.append("result", topic, body, 1, False, response_topic=reply_to, correlation=req.msg.correlation)

    async def close(self) -> None:
        """Wait for running commands to finish (bounded), then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass(slots=True)
class _Request:
    """One MQTT request being answered: where its result goes, and what is known of it so far."""

    eid: str
    name: str
    msg: Incoming
    reply_problem: str | None  # why its MQTT 5 response topic is not used, or None
    request_id: str | None = None
    first: asyncio.Future[dict[str, Any]] | None = None  # its result, for duplicates that arrive meanwhile
    reply_logged: bool = False

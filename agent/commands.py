"""The one command router: MQTT command topics and the HTTP API both come through here.

Only declared commands run; the driver that owns a command kind validates its parameters; the
equipment's current state must allow the command; MQTT requests are refused when retained, too old or
expired, and a `request_id` seen in the last 10 minutes gets its first result again instead of running
twice. Every attempt is logged with its outcome.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent import metrics
from agent.config import AgentConfig, CommandBase, EquipmentConfig
from agent.errors import CommandError, RejectedError, TransientError
from agent.model import CommandResult, iso, json_safe, parse_iso, utcnow
from agent.monitor import Sink
from agent.mqtt import Incoming
from drivers.base import Driver
from drivers.registry import get_driver

log = structlog.get_logger("edge_agent.commands")

DEDUP_WINDOW_S = 600.0
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

    # -- the shared entry point

    async def execute(
        self, eid: str, name: str, params: Any, *, source: str, caller: str | None = None
    ) -> tuple[dict[str, Any], int]:
        """Run one command; return the result body and the HTTP status it maps to."""
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
        metrics.COMMANDS.labels(
            eid, name if status != 404 else "_unknown", "ok" if result.success else reason or "failed"
        ).inc()
        log.info(
            "command",
            equipment_id=eid,
            command=name,
            source=source,
            caller=caller,
            parameters=_loggable(params),
            success=result.success,
            reason=reason,
            message=result.message,
            duration_s=round(time.monotonic() - started, 3),
        )
        return body, status

    async def _run(self, eid: str, name: str, params: Any) -> CommandResult:
        eq = self._equipment(eid)
        if eq is None:
            raise CommandError(f"unknown equipment {eid!r}", "unknown_equipment", 404)
        cmd = eq.command(name)
        if cmd is None:
            raise CommandError(f"command {name!r} is not declared for equipment {eid!r}", "unknown_command", 404)
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise CommandError(f"command {name!r}: parameters must be an object", "bad_parameters")
        driver_cls = get_driver(eq.driver)
        if cmd.kind == "load_process":
            checked = _validate_load_process(cmd, params)
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
        root = self.cfg.root_topic
        parts = msg.topic[len(root) + 1 :].split("/") if msg.topic.startswith(root + "/") else []
        if len(parts) != 4 or parts[0] != "equipment" or parts[2] != "cmd":
            log.warning("command_topic_unknown", topic=msg.topic)
            return
        eid, name = parts[1], parts[3]
        reply_topic = f"{msg.topic}/result"
        try:
            request = json.loads(msg.payload.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("the request is not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            self._refuse(eid, name, None, f"malformed request: {err}", "malformed", reply_topic, msg)
            return
        request_id = request.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            self._refuse(eid, name, None, "request_id is required (a non-empty string)", "malformed", reply_topic, msg)
            return
        if msg.retain:
            self._refuse(eid, name, request_id, "expired: a retained request is never run", "expired", reply_topic, msg)
            return
        sent_at = request.get("sent_at")
        if sent_at is not None:
            try:
                age = time.time() - parse_iso(str(sent_at)).timestamp()
            except ValueError:
                self._refuse(eid, name, request_id, f"malformed sent_at {sent_at!r}", "malformed", reply_topic, msg)
                return
            if age > self.cfg.mqtt.command_max_age_s:
                self._refuse(
                    eid,
                    name,
                    request_id,
                    f"expired: sent {age:.0f} s ago, older than command_max_age_s",
                    "expired",
                    reply_topic,
                    msg,
                )
                return
        if msg.expiry_s is not None and msg.expiry_s <= 0:
            self._refuse(eid, name, request_id, "expired: message expiry passed", "expired", reply_topic, msg)
            return
        key = f"{eid}/{name}/{request_id}"
        self._expire_seen()
        seen = self._seen.get(key)
        if seen is not None:
            first = await asyncio.shield(seen[1])
            log.info("command_duplicate", equipment_id=eid, command=name, request_id=request_id)
            self._publish(eid, name, dict(first), msg)
            return
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._seen[key] = (time.monotonic(), fut)
        try:
            body, _ = await self.execute(eid, name, request.get("parameters"), source="mqtt", caller=request_id)
        except BaseException as err:
            fut.set_exception(err)
            fut.exception()  # a waiting duplicate re-raises; nobody else needs it
            raise
        result = {"request_id": request_id, **body}
        fut.set_result(result)
        self._publish(eid, name, dict(result), msg)

    def _expire_seen(self) -> None:
        cutoff = time.monotonic() - DEDUP_WINDOW_S
        while self._seen:
            _, (at, _) = next(iter(self._seen.items()))
            if at >= cutoff:
                break
            self._seen.popitem(last=False)

    def _refuse(
        self, eid: str, name: str, request_id: str | None, message: str, reason: str, topic: str, msg: Incoming
    ) -> None:
        log.info(
            "command",
            equipment_id=eid,
            command=name,
            source="mqtt",
            caller=request_id,
            success=False,
            reason=reason,
            message=message,
        )
        metrics.COMMANDS.labels(eid, name, reason).inc()
        body = {
            "request_id": request_id,
            "success": False,
            "message": message,
            "data": {"reason": reason},
            "timestamp": iso(utcnow()),
        }
        self._publish(eid, name, body, msg)

    def _publish(self, eid: str, name: str, body: dict[str, Any], msg: Incoming) -> None:
        topic = f"{self.cfg.root_topic}/equipment/{eid}/cmd/{name}/result"
        self.store.append(
            "result", topic, body, 1, False, response_topic=msg.response_topic, correlation=msg.correlation
        )

    async def close(self) -> None:
        """Wait for running commands to finish (bounded), then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5.0)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _validate_load_process(cmd: CommandBase, params: dict[str, Any]) -> dict[str, Any]:
    extra = set(params) - {"process_id"}
    if extra:
        raise CommandError(f"command {cmd.name!r}: unknown parameter(s) {', '.join(sorted(extra))}", "bad_parameters")
    pid = params.get("process_id")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
        raise CommandError(f"command {cmd.name!r}: parameter 'process_id' is required", "bad_parameters")
    return {"process_id": str(pid)}


def _loggable(params: Any) -> Any:
    """Parameters for the audit log, bounded in size."""
    text = json.dumps(json_safe(params), default=str) if params is not None else "{}"
    return text if len(text) <= 500 else text[:500] + "..."

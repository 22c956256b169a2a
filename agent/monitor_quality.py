"""Quality results: made durable by the MPM outbox's handler, published with their delivery state, and
the driver told the outcome."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent import metrics
from agent.model import QualityResult, iso, json_safe, utcnow

log = structlog.get_logger("edge_agent.monitor")

# (equipment id, result, idempotency key) -> (new, delivery state)
QualityHandler = Callable[[str, dict[str, Any], str], Awaitable[tuple[bool, str]]]


async def commit_quality(
    handler: QualityHandler | None, publish: Callable[..., None], eid: str, q: QualityResult
) -> bool:
    """Hand `q` to `handler` and `publish` it; settle `q.committed`. True when it was committed."""
    result = dict(q.result)
    result.setdefault("equipment_id", eid)
    result.setdefault("timestamp", iso(utcnow()))
    try:
        if handler is not None:
            new, delivery = await handler(eid, result, q.idempotency_key)
        else:
            new, delivery = True, "disabled"
        extra: dict[str, Any] = {"duplicate": True} if not new else {}
        if not new:
            metrics.OUTBOX_DUPLICATES.inc()
        publish(eid, result, delivery, q.idempotency_key, **extra)
    except Exception as err:
        # Not durable: the driver keeps its source (a file stays claimed) and offers it again later.
        log.error("quality_result_not_committed", equipment_id=eid, key=q.idempotency_key, error=str(err))
        if q.committed is not None and not q.committed.done():
            q.committed.set_exception(err)
        return False
    if q.committed is not None and not q.committed.done():
        q.committed.set_result(new)
    return True


def quality_payload(eid: str, result: dict[str, Any], delivery: str, key: str, extra: dict[str, Any]) -> Any:
    """The quality message: the result, its `mpm_delivery` state and idempotency key."""
    payload = json_safe(dict(result))
    payload["equipment_id"] = payload.get("equipment_id") or eid
    payload["mpm_delivery"] = delivery
    payload["idempotency_key"] = key
    payload.update(extra)
    return payload

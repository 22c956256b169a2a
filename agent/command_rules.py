"""The rules the command router applies before a command runs, kept apart from the running itself.

Who may run a command (roles), whether an MQTT request's `sent_at` and MQTT 5 response topic are
acceptable, and the shape of `load_process`'s parameters. Pure functions: nothing here does I/O.
"""

from __future__ import annotations

import json
from typing import Any

from agent.config import CommandBase, Role
from agent.errors import CommandError
from agent.model import json_safe, parse_iso

MAX_TOPIC_BYTES = 65535  # MQTT's limit on a topic name
ROLE_RANK: dict[Role, int] = {"viewer": 0, "operator": 1, "admin": 2}


class Forbidden(CommandError):
    """The caller's role is below the one needed (`reason` forbidden; HTTP answers 403)."""

    def __init__(self, role: Role, needed: Role) -> None:
        super().__init__(f"role {role!r} may not do this (needs {needed!r})", "forbidden", 403)
        self.role = role
        self.needed = needed


def check_role(role: Role, needed: Role) -> None:
    """Raise `Forbidden` unless `role` is at least `needed` (viewer < operator < admin)."""
    if ROLE_RANK[role] < ROLE_RANK[needed]:
        raise Forbidden(role, needed)


def response_topic_problem(topic: str | None, root: str) -> str | None:
    """Why an MQTT 5 response topic may not carry a result, or None when it may (or there is none).

    The agent's own topics are refused: a requester could otherwise make the agent publish over its
    retained status, its birth or another equipment's results.
    """
    if topic is None:
        return None
    if not topic:
        return "empty"
    if "+" in topic or "#" in topic:
        return "contains a wildcard"
    if "\0" in topic:
        return "contains a NUL character"
    if topic == root or topic.startswith(root + "/"):
        return "under the agent's own topic root"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"longer than {MAX_TOPIC_BYTES} bytes"
    return None


def sent_at_problem(sent_at: Any, max_age_s: float, now: float) -> tuple[str, str] | None:
    """(message, reason) when a request's `sent_at` refuses it at wall-clock time `now`, else None.

    Too old is `expired`; more than `max_age_s` in the future is `clock_skew` (otherwise a request
    from a requester whose clock is ahead would never age out); absent (or null) is allowed.
    """
    if sent_at is None:
        return None
    try:
        at = parse_iso(sent_at).timestamp() if isinstance(sent_at, str) else None
    except ValueError:
        at = None
    if at is None:
        return f"malformed sent_at {loggable(sent_at, 80)}: not an ISO 8601 timestamp", "malformed"
    age = now - at
    if age > max_age_s:
        return f"expired: sent {age:.0f} s ago, older than command_max_age_s ({max_age_s:g} s)", "expired"
    if -age > max_age_s:
        return (
            f"clock_skew: sent_at is {-age:.0f} s in the future, more than command_max_age_s ({max_age_s:g} s);"
            " check the requester's clock",
            "clock_skew",
        )
    return None


def validate_load_process(cmd: CommandBase, params: dict[str, Any]) -> dict[str, Any]:
    """`load_process`'s parameters: exactly `process_id`, a non-empty string or integer."""
    extra = set(params) - {"process_id"}
    if extra:
        raise CommandError(f"command {cmd.name!r}: unknown parameter(s) {', '.join(sorted(extra))}", "bad_parameters")
    pid = params.get("process_id")
    if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
        raise CommandError(f"command {cmd.name!r}: parameter 'process_id' is required", "bad_parameters")
    return {"process_id": str(pid)}


def loggable(params: Any, limit: int = 500) -> str:
    """Parameters for the audit log (or a value for a message), bounded in size."""
    text = json.dumps(json_safe(params), default=str) if params is not None else "{}"
    return text if len(text) <= limit else text[:limit] + "..."

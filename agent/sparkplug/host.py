"""Primary Host awareness: the host application's retained `spBv1.0/STATE/<primary_host_id>` (JSON
`{"online": bool, "timestamp": ms}`, QoS 1, retained: the host's, never ours). While the host is not online
the edge node is not born and its stored data waits in the store; when it comes online the node is born and
what waited goes out as historical. A host that goes offline ends the node's session (NDEATH, disconnect,
connect again and wait), as the specification requires."""

from __future__ import annotations

import structlog

from agent import sparkplug
from agent.jsonin import InputError, loads

log = structlog.get_logger("edge_agent.sparkplug")

STATE_MAX_BYTES = 4096


class PrimaryHost:
    """What the edge node knows of its primary host; without one configured it is always online."""

    def __init__(self, host_id: str | None) -> None:
        self.host_id = host_id
        self.topic = f"{sparkplug.NAMESPACE}/STATE/{host_id}" if host_id else None
        self.online = host_id is None
        self._stamp = -1

    def reset(self) -> None:
        """A new connection: offline until the (retained) STATE says otherwise. The last timestamp taken is
        kept: a retained STATE older than it is still stale."""
        self.online = self.host_id is None

    def update(self, data: bytes) -> bool | None:
        """Take a STATE message; the new online flag when it changed, else None. An older timestamp than
        the last taken is a stale message and is ignored, as the specification requires."""
        try:
            state = loads(data, max_bytes=STATE_MAX_BYTES, what="primary host STATE")
        except InputError as err:
            log.warning("sparkplug_host_state_malformed", host=self.host_id, reason=err.reason)
            return None
        if not isinstance(state, dict) or not isinstance(state.get("online"), bool):
            log.warning("sparkplug_host_state_malformed", host=self.host_id, reason="no online flag")
            return None
        stamp = state.get("timestamp")
        stamp = stamp if isinstance(stamp, int) and not isinstance(stamp, bool) else self._stamp
        if stamp < self._stamp:
            # A host whose clock went back stays unheard until a restart: say why nothing happens.
            log.warning("sparkplug_host_state_stale", host=self.host_id, timestamp=stamp, last_taken=self._stamp)
            return None
        self._stamp = stamp
        if state["online"] == self.online:
            return None
        self.online = state["online"]
        log.info("sparkplug_host_online" if self.online else "sparkplug_host_offline", host=self.host_id)
        return self.online

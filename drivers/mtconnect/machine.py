"""What a device's observations say about the machine: its status in the contract's vocabulary, and its
conditions as alerts.

Status uses the standard's vocabulary: Availability UNAVAILABLE is offline, an active Fault is error,
otherwise the Execution state decides (a `[equipment.status] map` may add or override entries).
"""

from __future__ import annotations

from typing import Any

from drivers.mtconnect.documents import UNAVAILABLE, Device, Observation
from drivers.sdk import StatusFact

EXECUTION_STATUS = {
    "ACTIVE": "running",
    "READY": "idle",
    "STOPPED": "idle",
    "PROGRAM_COMPLETED": "idle",
    "INTERRUPTED": "paused",
    "FEED_HOLD": "paused",
    "OPTIONAL_STOP": "paused",
    "PROGRAM_STOPPED": "paused",
}
SEVERITY = {"Fault": "critical", "Warning": "warning"}


def _known(value: object) -> str | None:
    """An event's value as text, or None when it is unavailable or empty."""
    if value is None or value == UNAVAILABLE or value == "":
        return None
    return str(value)


class Machine:
    """The state a device's observations build up: the values that feed status, and active conditions."""

    def __init__(self, device: Device, status_map: dict[str, str], process_item: str | None = None) -> None:
        self.execution_map = {**EXECUTION_STATUS, **status_map}

        def ref(type_: str) -> str | None:
            item = device.first_of(type_)
            return item.id if item is not None else None

        process = device.find(process_item) if process_item else device.first_of("PART_ID")
        self.roles = {
            "availability": ref("AVAILABILITY"),
            "execution": ref("EXECUTION"),
            "program": ref("PROGRAM"),
            "controller_mode": ref("CONTROLLER_MODE"),
            "process_id": process.id if process is not None else None,
        }
        self._by_item = {item: role for role, item in self.roles.items() if item is not None}
        self.conditions = {i.id for i in device.items.values() if i.category == "CONDITION"}
        self.status_items = set(self._by_item) | self.conditions  # the items whose values may change status
        self.values: dict[str, str | None] = {}
        # condition item -> native code -> (level, message), the conditions active now
        self.active: dict[str, dict[str, tuple[str, str]]] = {}

    def reset_conditions(self) -> None:
        """Forget the active conditions (a /current document lists them all again)."""
        self.active = {item: {} for item in self.conditions}

    def apply(self, obs: Observation) -> bool:
        """Take one observation; True when it changed a condition's active set (its alerts)."""
        role = self._by_item.get(obs.item_id)
        if role is not None:
            self.values[role] = _known(obs.value)
        if obs.level is None or obs.item_id not in self.conditions:
            return False
        codes = self.active.setdefault(obs.item_id, {})
        before = dict(codes)
        code = obs.native_code or ""
        if obs.level == "Normal":
            if obs.native_code:
                codes.pop(code, None)
            else:
                codes.clear()  # a Normal without a code clears every condition of the item
        elif obs.level in SEVERITY:
            text = obs.value if isinstance(obs.value, str) and obs.value else f"{obs.level} on {obs.item_id}"
            codes[code] = (obs.level, text)
        # Unavailable says nothing about the machine's conditions: the active ones stay until told otherwise.
        return codes != before

    def alerts(self, item_id: str) -> dict[str, tuple[str, str]]:
        """The alerts of one condition item: native code -> (severity, message)."""
        return {code: (SEVERITY[level], msg) for code, (level, msg) in self.active.get(item_id, {}).items()}

    def status(self) -> StatusFact:
        """The status these values give."""
        v = self.values
        metadata: dict[str, Any] = {
            k: v[k] for k in ("execution", "availability", "controller_mode") if v.get(k) is not None
        }
        fault = next((msg for codes in self.active.values() for lvl, msg in codes.values() if lvl == "Fault"), None)
        fact = StatusFact("unknown", v.get("program"), None, None, v.get("process_id"), metadata)
        if self.roles["availability"] is not None and v.get("availability") is None:
            fact.status = "offline"  # the standard's UNAVAILABLE: the agent has no data from the machine
        elif fault is not None:
            fact.status = "error"
            fact.error_message = fault
        elif v.get("execution") is not None:
            mapped = self.execution_map.get(v["execution"] or "")
            fact.status = mapped if mapped is not None else "unknown"
            if mapped is None:
                metadata["raw_status"] = v["execution"]
        return fact

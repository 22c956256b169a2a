"""The rules the monitor applies to values: matching a status map, reporting by exception with a
deadband, and deriving the status object per the contract from what an equipment last gave."""

from __future__ import annotations

import math
from typing import Any

from agent.model import EquipmentStatus, json_safe
from agent.monitor_state import EquipmentState


def status_key(value: Any) -> str:
    """How a status-tag value matches a map key: integers and integral floats by their integer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def number(value: Any) -> float | None:
    """A value as a float when it is a number (a bool counts as 0 or 1), else None."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def changed(value: Any, last: Any, deadband: float) -> bool:
    """Whether `value` is to be reported, `last` being the value last reported."""
    if type(value) is not type(last) and not (isinstance(value, (int, float)) and isinstance(last, (int, float))):
        return True
    if isinstance(value, float) or isinstance(last, float):
        a, b = float(value), float(last)
        if a != a or b != b:  # NaN: a change only to or from NaN
            return (a != a) != (b != b)
        if deadband > 0:
            return abs(a - b) >= deadband
        return a != b
    if deadband > 0 and isinstance(value, int) and not isinstance(value, bool):
        return abs(value - last) >= deadband
    return bool(value != last)


def is_stale(st: EquipmentState, now: float) -> bool:
    """Whether the status tag's value is older than the equipment's `stale_after_s`."""
    return bool(st.stale_after_s > 0 and st.status_value_at is not None and now - st.status_value_at > st.stale_after_s)


def derive_status(st: EquipmentState, now: float) -> EquipmentStatus:
    """The status object for what the equipment has given so far (`now` on the monitor's clock)."""
    eq = st.cfg
    new = EquipmentStatus(equipment_id=eq.id, type=eq.type, status="unknown")
    if not st.connected:
        new.status = "offline"
        new.error_message = st.connection_error
        return new
    if st.fact is not None:
        f = st.fact
        new.status = f.status
        new.current_operation = f.current_operation
        new.progress = f.progress
        new.error_message = f.error_message
        new.process_id = f.process_id
        new.metadata = dict(f.metadata)
    elif eq.status is None or eq.status.tag is None:
        new.status = "idle" if eq.status is None else "unknown"
    else:
        r = st.values.get(eq.status.tag)
        if r is None or st.status_value_at is None:
            new.status = "unknown"
        elif r.quality == "bad":
            new.status = "unknown"
            new.metadata["raw_status_quality"] = r.quality
        elif is_stale(st, now):
            new.status = "unknown"
            new.metadata["stale"] = True
        else:
            mapped = eq.status.map.get(status_key(r.value))
            if mapped is None:
                new.status = "unknown"
                new.metadata["raw_status"] = json_safe(r.value)
            else:
                new.status = mapped
    sc = eq.status
    if sc is not None:
        if sc.progress_tag and (p := st.values.get(sc.progress_tag)) is not None and p.quality != "bad":
            num = number(p.value)
            if num is not None and math.isfinite(num):
                new.progress = min(1.0, max(0.0, num))
        if sc.operation_tag and (o := st.values.get(sc.operation_tag)) is not None and o.quality != "bad":
            new.current_operation = str(o.value) if o.value not in (None, "") else None
        if sc.process_id_tag and (j := st.values.get(sc.process_id_tag)) is not None and j.quality != "bad":
            new.process_id = status_key(j.value) if j.value not in (None, "", 0) else None
        if sc.error_tag and (e := st.values.get(sc.error_tag)) is not None and e.quality != "bad":
            new.error_message = str(e.value) if e.value not in (None, "", 0) else None
    return new

"""Equipment status to MPM process status, per the contract's rules, through the durable outbox.

The rules are judged against the last status sent to MPM for the equipment's open process, never
against the previous equipment status, so an outage (offline, unknown) in between changes nothing:
- `running` with a process_id sends `running` for it; a new process_id while one is open completes
  the old one first;
- `paused` sends `paused`;
- `idle` after running or paused sends `completed`, `error` sends `failed`, both for the open process
  even when the new status carries no process_id; the process is then closed;
- `offline` and `unknown` (and `maintenance`, which the contract gives no MPM meaning) send nothing.

The open process, the last status sent and a transition counter are kept per equipment in the outbox's
database, committed in the same transaction as the updates they caused, so a restart neither forgets
an open process nor sends an update twice: idempotency keys are derived from (database epoch,
equipment, process, transition number, status), the same after a restart for the same update.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

import structlog

from agent.model import EquipmentStatus
from agent.outbox import Outbox, StatusUpdate

log = structlog.get_logger("edge_agent.process_sync")

_ACTIVE = ("running", "paused")


@dataclass(slots=True)
class _Open:
    """What MPM was last told about an equipment's open process."""

    process_id: str | None = None
    last_sent: str | None = None
    seq: int = 0


class ProcessSync:
    """Feeds equipment status changes to MPM as process status updates (see the module docstring)."""

    def __init__(self, outbox: Outbox, *, metadata_fields: bool = True) -> None:
        self.outbox = outbox
        self.metadata_fields = metadata_fields
        epoch = outbox.get_state("process_sync:epoch")
        if epoch is None:
            # A fresh database (also one started after a corrupt file) gets new keys, never reused ones.
            epoch = secrets.token_hex(8)
            outbox.set_state("process_sync:epoch", epoch)
        self._epoch = epoch
        self._cache: dict[str, _Open] = {}

    def open_process(self, equipment_id: str) -> str | None:
        """The process currently open for an equipment, if any."""
        return self._load(equipment_id).process_id

    def _load(self, eid: str) -> _Open:
        cached = self._cache.get(eid)
        if cached is not None:
            return cached
        raw = self.outbox.get_state(f"process_sync:{eid}")
        st = _Open()
        if raw:
            try:
                data = json.loads(raw)
                st = _Open(data.get("process_id"), data.get("last_sent"), int(data.get("seq", 0)))
            except (ValueError, TypeError, AttributeError):
                log.warning("process_sync_state_unreadable", equipment_id=eid)
        self._cache[eid] = st
        return st

    def _key(self, eid: str, pid: str, seq: int, status: str) -> str:
        text = "\0".join((self._epoch, eid, pid, str(seq), status))
        return "ps-" + hashlib.sha256(text.encode()).hexdigest()[:40]

    def on_status(self, equipment_id: str, status: EquipmentStatus) -> list[tuple[str, str]]:
        """Apply one equipment status; returns the (process_id, MPM status) updates it enqueued."""
        cur = self._load(equipment_id)
        new = _Open(cur.process_id, cur.last_sent, cur.seq)
        planned: list[tuple[str, str]] = []

        def send(pid: str, mpm_status: str) -> None:
            planned.append((pid, mpm_status))
            new.seq += 1

        s = status.status
        pid = status.process_id or None
        if s == "running":
            if pid and new.process_id and pid != new.process_id:
                # A new job while one is open: the old one is finished first.
                if new.last_sent in _ACTIVE:
                    send(new.process_id, "completed")
                new.process_id, new.last_sent = None, None
            target = pid or new.process_id
            if target and not (target == new.process_id and new.last_sent == "running"):
                # A running status without a process_id only resumes the open process.
                if pid or new.last_sent == "paused":
                    send(target, "running")
                    new.process_id, new.last_sent = target, "running"
        elif s == "paused":
            if pid and new.process_id and pid != new.process_id:
                if new.last_sent in _ACTIVE:
                    send(new.process_id, "completed")
                new.process_id, new.last_sent = None, None
            target = new.process_id or pid
            if target and new.last_sent != "paused":
                send(target, "paused")
                new.process_id, new.last_sent = target, "paused"
        elif s in ("idle", "error"):
            if new.process_id and new.last_sent in _ACTIVE:
                send(new.process_id, "completed" if s == "idle" else "failed")
            new.process_id, new.last_sent = None, None
        else:
            return []  # offline, unknown, maintenance: nothing is sent and nothing is forgotten

        if (new.process_id, new.last_sent) == (cur.process_id, cur.last_sent) and not planned:
            return []
        updates = []
        seq = cur.seq
        for target, mpm_status in planned:
            seq += 1
            updates.append(
                StatusUpdate(
                    process_id=target,
                    equipment_id=equipment_id,
                    status=mpm_status,
                    metadata=self._metadata(status),
                    idempotency_key=self._key(equipment_id, target, seq, mpm_status),
                )
            )
        state = json.dumps({"process_id": new.process_id, "last_sent": new.last_sent, "seq": new.seq})
        added = self.outbox.enqueue_statuses(updates, (f"process_sync:{equipment_id}", state))
        self._cache[equipment_id] = new
        for (target, mpm_status), was_new in zip(planned, added, strict=True):
            log.info(
                "process_status_queued",
                equipment_id=equipment_id,
                process_id=target,
                status=mpm_status,
                duplicate=not was_new,
            )
        return planned

    def _metadata(self, status: EquipmentStatus) -> dict[str, Any]:
        if not self.metadata_fields:
            return {}
        meta: dict[str, Any] = {"equipment_id": status.equipment_id, "equipment_status": status.status}
        if status.error_message:
            meta["error_message"] = status.error_message
        if status.current_operation:
            meta["current_operation"] = status.current_operation
        return meta

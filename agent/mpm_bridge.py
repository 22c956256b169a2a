"""The daemon's link to MPM: the client, the durable outbox, process status sync and quality results.

Started with the daemon when `[mpm]` is configured. Quality results from drivers are committed to the
outbox before their source is released; each delivery or rejection is published again on the quality
topic with its `mpm_delivery`; equipment status changes become process status updates; `load_process`
reads its parameters through the client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import DataError
from agent.model import EquipmentStatus
from agent.mpm import MPMClient
from agent.outbox import Outbox, OutboxItem
from agent.process_sync import ProcessSync

if TYPE_CHECKING:
    from agent.commands import CommandRouter
    from agent.config import AgentConfig
    from agent.config_holder import ConfigHolder
    from agent.monitor import Monitor

log = structlog.get_logger("edge_agent.mpm")


class MpmBridge:
    """Wires the MPM client, outbox and process sync into the monitor and the command router."""

    def __init__(self, config: ConfigHolder, monitor: Monitor, router: CommandRouter) -> None:
        self.config = config
        self.monitor = monitor
        self.router = router
        self.client: MPMClient | None = None
        self.outbox: Outbox | None = None
        self.sync: ProcessSync | None = None
        self._unhook: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Open the outbox and start delivering."""
        cfg = self.config.cfg
        if cfg.mpm is None:
            return
        self.client = MPMClient.from_config(cfg.mpm)
        self.outbox = Outbox(
            cfg.agent.state_dir / "outbox.sqlite",
            self.client,
            backoff_max_s=cfg.agent.reconnect_max_s,
            on_outcome=self._outcome,
            max_body_bytes=cfg.mpm.max_body_bytes,
        )
        self.sync = ProcessSync(self.outbox)
        self._unhook = [
            self.monitor.set_quality_handler(self._quality),
            self.monitor.add_status_listener(self._status),
            self.router.set_parameter_source(self._parameters),
        ]
        await self.outbox.start()
        log.info("mpm_enabled", base_url=cfg.mpm.base_url, auth=cfg.mpm.auth, pending=self.outbox.depth())

    async def stop(self) -> None:
        """Stop delivering; what is left stays in the outbox for the next start."""
        for unhook in self._unhook:
            unhook()
        self._unhook = []
        if self.outbox is not None:
            await self.outbox.stop(grace_s=min(2.0, self.config.cfg.agent.shutdown_grace_s))
            self.outbox.close()
            self.outbox = None
        if self.client is not None:
            await self.client.close()
            self.client = None

    async def reload(self, old: AgentConfig, new: AgentConfig) -> None:
        """SIGHUP: new credentials or URL get a new client for the same outbox (nothing it holds is dropped);
        adding or removing `[mpm]` starts or stops it; either way delivery is retried at once."""
        if _mpm(old) == _mpm(new):
            if self.outbox is not None:
                self.outbox.retry_now()  # the key may have been fixed on MPM's side
            return
        if old.mpm is None or new.mpm is None or self.outbox is None:
            await self.stop()
            await self.start()
            return
        client, previous = MPMClient.from_config(new.mpm), self.client
        self.client = client
        self.outbox.max_body_bytes = new.mpm.max_body_bytes
        await self.outbox.set_client(client)
        if previous is not None:
            await previous.close()
        log.info("mpm_reconfigured", base_url=new.mpm.base_url, auth=new.mpm.auth, pending=self.outbox.depth())

    def health(self) -> dict[str, Any] | None:
        """The outbox's health (see `Outbox.health`), None without `[mpm]`."""
        return None if self.outbox is None else self.outbox.health()

    # -- hooks

    async def _quality(self, eid: str, result: dict[str, Any], key: str) -> tuple[bool, str]:
        assert self.outbox is not None
        pid = result.get("process_id")
        if not isinstance(pid, str) or not pid:
            raise DataError(f"quality result from {eid!r} has no process_id")
        new = self.outbox.enqueue_quality(pid, eid, result, key)
        # A key already pending or delivered is not sent again; the contract reports it as delivered.
        return new, "pending" if new else "delivered"

    def _status(self, eid: str, new: EquipmentStatus, old: EquipmentStatus | None) -> None:
        if self.sync is not None:
            self.sync.on_status(eid, new)

    async def _parameters(self, process_id: str) -> dict[str, Any]:
        assert self.client is not None
        return dict(await self.client.get_process_parameters(process_id))

    def _outcome(self, item: OutboxItem, state: str) -> None:
        if item.kind != "quality_result":
            if state == "rejected":
                log.warning("mpm_status_rejected", process_id=item.process_id, reason=item.reason)
            return
        body = item.payload()
        if not isinstance(body, dict):
            return
        extra: dict[str, Any] = {}
        if state == "rejected":
            extra = {"mpm_status_code": item.status_code, "mpm_reason": item.reason}
        self.monitor.publish_quality(item.equipment_id or "", body, state, item.idempotency_key, **extra)


def _mpm(cfg: AgentConfig) -> Any:
    if cfg.mpm is None:
        return None
    return (cfg.mpm.model_dump(mode="json"), dict(cfg.mpm._secrets))

"""Optional components started with the daemon: the MPM outbox and the local HTTP API, when present."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.supervisor import Supervisor


def build_extensions(sup: Supervisor) -> list[Any]:
    """The components this build of the daemon has, wired to the supervisor."""
    out: list[Any] = []
    from agent.mpm_bridge import MpmBridge

    out.append(MpmBridge(sup))  # idle without [mpm]; a reload that adds the section starts it
    if sup.cfg.http.enabled:
        from agent.http import HttpApi

        out.append(HttpApi(sup))
    return out

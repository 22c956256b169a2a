"""What the systemd unit must allow for a config: the folders the service writes (for `ReadWritePaths=`)."""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig

#: The unit's StateDirectory=: writable already.
UNIT_STATE_DIR = Path("/var/lib/edge-agent")


def writable_paths(cfg: AgentConfig) -> list[Path]:
    """Every folder the daemon writes besides its StateDirectory: a state_dir elsewhere, and each driver's
    folders (connection fields of type path named `directory` or `*_dir`, e.g. a file drop's folders)."""
    out: list[Path] = []
    if cfg.agent.state_dir.resolve() != UNIT_STATE_DIR:
        out.append(cfg.agent.state_dir)
    for eq in cfg.equipment:
        conn = eq.connection
        fields = getattr(type(conn), "model_fields", {})
        for name in fields:
            value = getattr(conn, name, None)
            if isinstance(value, Path) and (name == "directory" or name.endswith("_dir")):
                out.append(value)
    seen: list[Path] = []
    for p in out:
        p = p.resolve()
        if p not in seen:
            seen.append(p)
    return seen

"""`edge-agent run`: load the config, check what the daemon will need, run the supervisor, and map the
outcome to the contract's exit codes (0 after a clean stop, 2 for a bad config or a start-up fault, 1 fatal)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ssl
from pathlib import Path

import structlog

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, StartupError
from agent.logging import configure as configure_logging
from agent.supervisor import Supervisor

log = structlog.get_logger("edge_agent.supervisor")


def release_memory() -> None:
    """Hand memory freed after start-up (the parsed TOML, validation scratch) back to the OS.

    Parsing a large config leaves many small freed blocks that glibc keeps; on a small edge box that is
    a few MiB per 10,000 tags that nobody uses again.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # What exists now (config, modules) lives as long as the process: keep the collector off it, so
    # collections triggered by the stream of readings stay cheap.
    gc.freeze()


def run_daemon(path: Path) -> int:
    """`edge-agent run`: load the config, run the daemon, map failures to the contract's exit codes."""
    try:
        cfg = load_config(path)
    except ConfigError as err:
        configure_logging()
        for line in err.problems:
            log.error("config_invalid", problem=line)
        return 2
    configure_logging(cfg.agent.log_level, cfg.agent.log_format)
    release_memory()
    try:
        check_readable_files(cfg)
        return asyncio.run(Supervisor(cfg).run())
    except StartupError as err:
        # A fault of the machine or the config's surroundings, not a bug: one line, no traceback.
        log.error("startup_failed", error=str(err))
        return 2
    except Exception:
        log.exception("fatal")
        return 1


def check_readable_files(cfg: AgentConfig) -> None:
    """Certificates and keys the daemon will need are readable now, not at the first connect."""
    m = cfg.mqtt
    checks: list[tuple[str, Path | None]] = [
        ("mqtt.ca_file", m.ca_file),
        ("mqtt.cert_file", m.cert_file),
        ("mqtt.key_file", m.key_file),
    ]
    if cfg.mpm is not None:
        checks.append(("mpm.ca_file", cfg.mpm.ca_file))
    for eq in cfg.equipment:
        conn = eq.connection
        for name in type(conn).model_fields:
            if name.endswith("_file"):
                value = getattr(conn, name, None)
                # Files a driver generates when absent (an OPC UA client certificate) may be missing.
                if isinstance(value, Path) and value.exists():
                    checks.append((f"equipment[{eq.id}].connection.{name}", value))
    for where, path in checks:
        if path is None:
            continue
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as err:
            raise StartupError(f"{where} {path}: {err.strerror or err}") from err
    if m.tls:
        try:
            ctx = ssl.create_default_context(cafile=str(m.ca_file) if m.ca_file else None)
            if m.cert_file:
                ctx.load_cert_chain(str(m.cert_file), str(m.key_file) if m.key_file else None)
        except (ssl.SSLError, OSError, ValueError) as err:
            raise StartupError(f"mqtt certificates cannot be used: {err}") from err

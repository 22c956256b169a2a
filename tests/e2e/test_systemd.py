"""The service: the unit passes systemd's own checks, the installer lays things out, sd_notify works."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

from peers import ROOT, Broker, Daemon, require_tool, write_config

VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin"


def render_unit(tmp: Path) -> Path:
    exe = VENV_BIN / "edge-agent"
    assert exe.exists(), exe
    text = (
        (ROOT / "systemd" / "edge-agent.service").read_text().replace("/opt/edge-agent/venv/bin/edge-agent", str(exe))
    )
    unit = tmp / "edge-agent.service"
    unit.write_text(text)
    return unit


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    unit = render_unit(tmp_path)
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    # verify exits 0 on some problems: its output must be empty of anything about our unit
    complaints = [
        line for line in (verify.stdout + verify.stderr).splitlines() if "edge-agent" in line or unit.name in line
    ]
    assert verify.returncode == 0 and not complaints, verify.stdout + verify.stderr
    sec = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=120
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0, sec.stdout
    text = unit.read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ExecStartPre=",
        "check-config",
        "DynamicUser=yes",
        "SupplementaryGroups=dialout",
        "DevicePolicy=closed",
        "DeviceAllow=char-ttyUSB rw",
        "DeviceAllow=char-ttyACM rw",
        "DeviceAllow=char-ttyS rw",
        "StateDirectory=",
    ):
        assert directive in text, directive
    assert "PrivateDevices=yes" not in text  # it would hide the serial ports


def test_installer_lays_out_config_unit_and_credentials(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    (prefix / "venv").mkdir(parents=True)
    (prefix / "venv" / "bin").symlink_to(VENV_BIN)
    etc = tmp_path / "etc"
    (etc / "credentials").mkdir(parents=True)
    (etc / "credentials" / "mqtt-password").write_text("not-used-here\n")
    units = tmp_path / "units"
    env = {
        **os.environ,
        "PREFIX": str(prefix),
        "ETC_DIR": str(etc),
        "UNIT_DIR": str(units),
        "SKIP_VENV": "1",
        "NO_SYSTEMCTL": "1",
    }
    out = subprocess.run(
        ["bash", str(ROOT / "systemd" / "install.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    unit = (units / "edge-agent.service").read_text()
    assert f"ExecStart={prefix}/venv/bin/edge-agent run" in unit
    assert f"EDGE_AGENT_CONFIG={etc}/agent.toml" in unit
    dropin = (units / "edge-agent.service.d" / "credentials.conf").read_text()
    assert f"LoadCredential=mqtt-password:{etc}/credentials/mqtt-password" in dropin
    config = (etc / "agent.toml").read_text()
    assert 'state_dir = "/var/lib/edge-agent"' in config and "/run/credentials/edge-agent.service/" in config
    check = subprocess.run(
        [str(VENV_BIN / "edge-agent"), "check-config", "--config", str(etc / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout
    # a second run keeps an edited config
    (etc / "agent.toml").write_text(config.replace('id = "cell-1"', 'id = "cell-9"'))
    subprocess.run(
        ["bash", str(ROOT / "systemd" / "install.sh")], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert 'id = "cell-9"' in (etc / "agent.toml").read_text()


def test_sd_notify_ready_then_watchdog(tmp_path: Path, broker: Broker) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    cfg = write_config(tmp_path, broker.port)
    daemon = Daemon(cfg, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}).start(wait=False)
    try:
        messages: list[str] = []
        while sum(1 for m in messages if "WATCHDOG=1" in m) < 3:
            messages.append(sock.recv(4096).decode())
        ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
        first_watchdog = next(i for i, m in enumerate(messages) if "WATCHDOG=1" in m)
        assert ready < first_watchdog, messages
        assert "STATUS=" in messages[ready]
        assert daemon.stop() == 0
        rest = []
        sock.settimeout(0.5)
        try:
            while True:
                rest.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        assert any("STOPPING=1" in m for m in rest)
    finally:
        daemon.kill()
        sock.close()

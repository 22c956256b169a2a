"""The service as plant boxes need it: the folders a config writes become ReadWritePaths, the serial ports
of edge boxes are allowed, and uninstall.sh takes it all away again (the config only with --purge)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from test_systemd import VENV_BIN

from peers import ROOT


def run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "systemd" / script), *args], env=env, capture_output=True, text=True, timeout=120
    )


def layout(tmp: Path) -> dict[str, str]:
    prefix = tmp / "opt"
    (prefix / "venv").mkdir(parents=True)
    (prefix / "venv" / "bin").symlink_to(VENV_BIN)
    return {
        **os.environ,
        "PREFIX": str(prefix),
        "ETC_DIR": str(tmp / "etc"),
        "UNIT_DIR": str(tmp / "units"),
        "SKIP_VENV": "1",
        "NO_SYSTEMCTL": "1",
    }


def test_unit_allows_the_serial_ports_of_edge_boxes() -> None:
    unit = (ROOT / "systemd" / "edge-agent.service").read_text()
    for group in ("ttyUSB", "ttyACM", "ttyS", "ttyAMA", "ttySC", "ttymxc", "ttyXRUSB"):
        assert f"DeviceAllow=char-{group} rw" in unit, group


def test_installer_opens_the_folders_the_config_writes(tmp_path: Path) -> None:
    env = layout(tmp_path)
    etc = tmp_path / "etc"
    etc.mkdir()
    drops = tmp_path / "srv" / "cmm"
    (etc / "agent.toml").write_text(
        f"""
[agent]
id = "cell-1"
site = "plant-a"
[mqtt]
password_file = "/run/credentials/edge-agent.service/mqtt-password"
username = "edge"
[[equipment]]
id = "cmm-1"
driver = "file_drop"
[equipment.connection]
directory = "{drops}/in"
processed_dir = "{drops}/done"
failed_dir = "/mnt/cmm-failed"
"""
    )
    out = run("install.sh", env)
    assert out.returncode == 0, out.stderr
    paths = (tmp_path / "units" / "edge-agent.service.d" / "paths.conf").read_text()
    rw = [line for line in paths.splitlines() if line.startswith("ReadWritePaths=")]
    assert rw == [f"ReadWritePaths=-{drops}/in", f"ReadWritePaths=-{drops}/done", "ReadWritePaths=-/mnt/cmm-failed"]
    assert "--credentials" in out.stdout  # how to check the config as the service sees it


def test_installer_with_an_invalid_config_warns_and_still_installs(tmp_path: Path) -> None:
    env = layout(tmp_path)
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "agent.toml").write_text("[agent]\nid = 'bad id'\n")
    out = run("install.sh", env)
    assert out.returncode == 0, out.stderr
    assert "no ReadWritePaths written" in out.stderr
    assert (tmp_path / "units" / "edge-agent.service").exists()


def test_uninstall_keeps_the_config_unless_purged(tmp_path: Path) -> None:
    env = layout(tmp_path)
    assert run("install.sh", env).returncode == 0
    units = tmp_path / "units"
    assert (units / "edge-agent.service").exists() and (units / "edge-agent.service.d" / "paths.conf").exists()
    out = run("uninstall.sh", env)
    assert out.returncode == 0, out.stderr
    assert not (units / "edge-agent.service").exists() and not (units / "edge-agent.service.d").exists()
    assert not (tmp_path / "opt" / "venv").exists()
    assert (tmp_path / "etc" / "agent.toml").exists()
    state = tmp_path / "state"
    state.mkdir()
    purged = run("uninstall.sh", {**env, "STATE_DIR": str(state)}, "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (tmp_path / "etc").exists() and not state.exists()

"""The command line as a user meets it: --version, status explaining itself, completion, simulate failing."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from agent import __version__
from peers import ROOT, TESTS, free_port, write_config


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`edge-agent ARGS` as a subprocess; output captured."""
    full = dict(os.environ)
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
    full.pop("EDGE_AGENT_CONFIG", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=120
    )


def test_version_flag_and_command() -> None:
    for args in (["--version"], ["version"]):
        out = cli(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"edge-agent {__version__}"


def test_help_texts_say_more_than_a_line() -> None:
    out = cli("--help")
    assert out.returncode == 0
    for word in ("docs/", "browse", "scan", "config sample", "test"):
        assert word in out.stdout, word
    assert "--credentials" in cli("check-config", "--help").stdout


def test_status_says_why_it_cannot_read_the_config(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    cfg = write_config(tmp_path, 1883, http=f'[http]\nlisten = "127.0.0.1:{port}"\n')
    cfg.write_text(cfg.read_text().replace("[mqtt]", "[mqtt]\nbogus = 1"))
    out = cli("status", "--config", str(cfg))
    assert out.returncode == 1
    assert "not valid" in out.stderr and "bogus" in out.stderr and "127.0.0.1:8710" in out.stderr
    missing = cli("status", "--config", str(tmp_path / "nope.toml"))
    assert "cannot read" in missing.stderr and "nope.toml" in missing.stderr


def test_status_reads_the_listen_address_without_secrets(tmp_path: Path) -> None:
    """An admin shell cannot read /run/credentials/...: status still finds the configured port."""
    port = free_port()
    cfg = write_config(
        tmp_path,
        1883,
        mqtt_extra='password_file = "/run/credentials/edge-agent.service/mqtt-password"\nusername = "u"',
        http=f'[http]\nlisten = "127.0.0.1:{port}"\n',
    )
    out = cli("status", "--config", str(cfg))
    assert out.returncode == 1
    assert f"127.0.0.1:{port}: unreachable" in out.stderr, out.stderr
    assert "not valid" not in out.stderr
    by_url = cli("status", "--url", f"http://127.0.0.1:{port}")
    assert by_url.returncode == 1 and f"127.0.0.1:{port}: unreachable" in by_url.stderr


def test_check_config_as_the_service_sees_it(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    cfg = write_config(
        tmp_path, 1883, mqtt_extra='username = "u"\npassword_file = "/run/credentials/edge-agent.service/mqtt-pw"'
    )
    plain = cli("check-config", "--config", str(cfg))
    assert plain.returncode == 2 and "/run/credentials/edge-agent.service/mqtt-pw" in plain.stdout
    absent = cli("check-config", "--config", str(cfg), "--credentials", str(creds))
    assert absent.returncode == 2 and str(creds / "mqtt-pw") in absent.stdout
    (creds / "mqtt-pw").write_text("s3cret\n")
    ok = cli("check-config", "--config", str(cfg), "--credentials", str(creds))
    assert ok.returncode == 0, ok.stdout
    assert "s3cret" not in ok.stdout + ok.stderr


def test_bash_completion_lists_commands_and_options(tmp_path: Path) -> None:
    out = cli("completion", "bash")
    assert out.returncode == 0
    script = tmp_path / "c.sh"
    script.write_text(out.stdout)
    probe = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=(edge-agent check-c); COMP_CWORD=1; _edge_agent; "
            'echo "${COMPREPLY[@]}"; COMP_WORDS=(edge-agent status --u); COMP_CWORD=2; _edge_agent; '
            'echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.splitlines() == ["check-config", "--url"], probe.stdout + probe.stderr


def test_simulate_exits_non_zero_when_a_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        body = f"""
[[equipment]]
id = "plc-1"
driver = "modbus"
[equipment.connection]
host = "127.0.0.1"
port = {port}
[[equipment.tags]]
name = "x"
address = 0
"""
        cfg = write_config(tmp_path, 1883, body)
        cfg.write_text(cfg.read_text().replace('driver_modules = ["scripted_driver"]', ""))
        out = cli("simulate", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "simulator_failed" in out.stdout + out.stderr


def test_status_watch_lines_name_alerts_and_bad_tags() -> None:
    from agent.cli_status import table

    data = {
        "equipment": [
            {
                "equipment_id": "plc-1",
                "type": "plc",
                "status": "running",
                "progress": 0.5,
                "last_value_age_s": 0.2,
                "alerts": [{"message": "Spindle overheating"}],
                "values": {"temp": {"value": 81, "quality": "good"}, "door": {"value": None, "quality": "bad"}},
            }
        ]
    }
    plain = table(data)
    assert plain[0].split()[:3] == ["EQUIPMENT", "TYPE", "STATUS"] and "50%" in plain[1] and len(plain) == 2
    detailed = table(data, details=True)
    assert detailed[2:] == ["ALERT plc-1: Spindle overheating", "BAD   plc-1.door: quality bad"]

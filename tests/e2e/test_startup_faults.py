"""Start-up faults of the machine around the daemon end it with exit 2 and one clear line, no traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fs import remount, tmpfs
from peers import GUARD_S, Broker, Daemon, script_line, scripted_equipment, write_config


def run_to_exit(daemon: Daemon) -> tuple[int, list[dict]]:
    daemon.start(wait=False)
    assert daemon.proc is not None
    code = daemon.proc.wait(timeout=GUARD_S)
    daemon.proc = None
    return code, daemon.logs()


def assert_one_clear_line(logs: list[dict], *words: str) -> None:
    text = "\n".join(str(e) for e in logs)
    assert "Traceback" not in text, text
    failed = [e for e in logs if e.get("event") == "startup_failed"]
    assert len(failed) == 1, text
    for w in words:
        assert w in failed[0]["error"], failed[0]


def test_http_port_taken(tmp_path: Path, broker: Broker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(
            tmp_path,
            broker.port,
            scripted_equipment("m1", tmp_path / "s.jsonl"),
            http=f'[http]\nlisten = "127.0.0.1:{port}"\n',
        )
        code, logs = run_to_exit(Daemon(cfg))
    assert code == 2
    assert_one_clear_line(logs, "http.listen", str(port), "in use")


def test_state_dir_not_writable(tmp_path: Path, broker: Broker) -> None:
    with tmpfs(tmp_path / "mnt", size_mib=4) as mnt:
        remount(mnt, "ro")
        cfg = write_config(tmp_path, broker.port, scripted_equipment("m1", tmp_path / "s.jsonl"))
        cfg.write_text(cfg.read_text().replace('state_dir = "state"', f'state_dir = "{mnt / "state"}"'))
        code, logs = run_to_exit(Daemon(cfg))
    assert code == 2
    assert_one_clear_line(logs, "agent.state_dir", "Read-only file system")


@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_unusable_certificate(tmp_path: Path, broker: Broker, kind: str) -> None:
    ca = tmp_path / "ca.pem"
    if kind == "directory":
        ca.mkdir()
    else:
        ca.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    script_line(tmp_path / "s.jsonl", tag="state", value=1)
    cfg = write_config(tmp_path, broker.port, scripted_equipment("m1", tmp_path / "s.jsonl"))
    cfg.write_text(
        cfg.read_text()
        .replace(f"mqtt://127.0.0.1:{broker.port}", f"mqtts://127.0.0.1:{broker.port}")
        .replace('topic_prefix = "edge"', f'topic_prefix = "edge"\nca_file = "{ca}"')
    )
    code, logs = run_to_exit(Daemon(cfg))
    assert code == 2
    assert_one_clear_line(logs, "ca_file" if kind == "directory" else "certificates")

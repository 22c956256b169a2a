"""`browse opcua` and `scan modbus` against real servers: the browsed stanzas make a config that checks and
reads; a scan finds exactly the addresses a device serves, over TCP and RTU."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import cli

from peers import LoopThread, ModbusPeer, OpcUaPeer, SocatPair


@pytest.fixture
def opcua() -> Iterator[OpcUaPeer]:
    peer = OpcUaPeer()
    try:
        yield peer
    finally:
        peer.close()


def endpoint(peer: OpcUaPeer) -> str:
    return f"opc.tcp://127.0.0.1:{peer.server.port}"


def test_browse_lists_variables_with_type_and_access(opcua: OpcUaPeer) -> None:
    out = cli("browse", "opcua", endpoint(opcua))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    setpoint = rows["nsu=urn:edge-agent:sim:machine;s=Machine.SpeedSetpoint"]
    assert setpoint[2:4] == ["Double", "read/write"]
    assert rows["nsu=urn:edge-agent:sim:spindle;s=Spindle.Temp"][2:4] == ["Double", "read"]
    assert rows["nsu=urn:edge-agent:sim:machine;s=Machine.PartCount"][2] == "UInt32"
    assert not [n for n in rows if n.startswith("i=")], "the standard's own nodes are left out under Objects"
    assert not any("Arguments" in line for line in out.stdout.splitlines()), "method arguments are not tags"
    shallow = cli("browse", "opcua", endpoint(opcua), "--depth", "0")
    assert "Machine.State" not in shallow.stdout  # the machine object's variables are one level further down


def test_browsed_stanzas_check_and_read(opcua: OpcUaPeer, tmp_path: Path) -> None:
    out = cli("browse", "opcua", endpoint(opcua), "--toml")
    assert out.returncode == 0, out.stderr
    names = re.findall(r'^name = "([^"]+)"$', out.stdout, re.M)
    assert len(names) == 11 and len(set(names)) == 11 and "machine_spindle_speed" in names
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\nid = "a"\nsite = "s"\nstate_dir = "state"\n\n[[equipment]]\nid = "m"\ndriver = "opcua"\n'
        f'[equipment.connection]\nendpoint = "{endpoint(opcua)}"\n{out.stdout}'
    )
    checked = cli("check-config", "--config", str(cfg))
    assert checked.returncode == 0, checked.stdout
    dry = cli("test", "--config", str(cfg), cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout
    for name in names:
        assert re.search(rf"^   {name} +\S.* \(good\)", dry.stdout, re.M), name


def test_browse_uses_the_configs_credentials(tmp_path: Path) -> None:
    peer = OpcUaPeer(users={"op": "pw-1"})
    try:
        url = endpoint(peer)
        (tmp_path / "pw").write_text("pw-1\n")
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'[agent]\nid = "a"\nsite = "s"\nstate_dir = "state"\n[[equipment]]\nid = "m"\ndriver = "opcua"\n'
            f'[equipment.connection]\nendpoint = "{url}"\nusername = "op"\npassword_file = "pw"\n'
            '[[equipment.tags]]\nname = "x"\nnode = "ns=2;s=Machine.State"\n'
        )
        denied = cli("browse", "opcua", url)
        assert denied.returncode == 1 and "cannot reach" in denied.stderr
        ok = cli("browse", "opcua", url, "--config", str(cfg), "--equipment", "m", cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert "Machine.State" in ok.stdout
        assert "pw-1" not in ok.stdout + ok.stderr
    finally:
        peer.close()


def scanned(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"^(holding|input|coil|discrete) \d+(-\d+)?$", line)]


def test_scan_finds_exactly_the_served_registers() -> None:
    peer = ModbusPeer(
        {"holding": [(0, 10), (40, 3), (97, 1)], "input": [(5, 2)], "coil": [(16, 16)], "discrete": [(5000, 1)]}
    )
    try:
        peer.call(peer.sim.set_registers, "holding", 41, [4242])
        target = f"127.0.0.1:{peer.port}"
        out = cli("scan", "modbus", target, "--range", "0-99")
        assert out.returncode == 0, out.stderr
        assert scanned(out.stdout) == ["holding 0-9", "holding 40-42", "holding 97", "input 5-6"]
        assert re.search(r"^holding +41 +4242$", out.stdout, re.M)
        bits = cli("scan", "modbus", target, "--table", "coil", "--table", "discrete", "--range", "0-3000")
        assert scanned(bits.stdout) == ["coil 16-31"], bits.stdout
        toml = cli("scan", "modbus", target, "--table", "holding", "--range", "38-45", "--toml")
        assert re.findall(r"^address = (\d+)", toml.stdout, re.M) == ["40", "41", "42"]
        assert "raw 4242 (0x1092)" in toml.stdout
        none = cli("scan", "modbus", target, "--table", "input", "--range", "100-120")
        assert none.returncode == 1 and "no address" in none.stderr
    finally:
        peer.close()


def test_scan_over_rtu(tmp_path: Path) -> None:
    from drivers.modbus.sim import SimServer

    pair = SocatPair(tmp_path)
    pair.start()
    loop = LoopThread("modbus-rtu")
    sim = SimServer({"holding": [(3, 4)], "input": [(100, 1)]}, unit_id=7)
    try:
        loop.run(sim.start_rtu(str(pair.a), baudrate=9600))
        out = cli(
            "scan", "modbus", str(pair.b), "--unit", "7", "--baudrate", "9600", "--range", "0-20", "--timeout", "0.5"
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert scanned(out.stdout) == ["holding 3-6"]
    finally:
        loop.run(sim.stop())
        loop.stop_loop()
        pair.stop()

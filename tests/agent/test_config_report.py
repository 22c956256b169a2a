"""check-config reports every problem in one pass, each located, equipment named by id, near misses named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from peers import GUARD_S, ROOT, Daemon


def check(tmp_path: Path, text: str | bytes, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    path = tmp_path / "agent.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().out.strip().splitlines()


def line_of(text: str, needle: str, nth: int = 1) -> int:
    hits = [i for i, line in enumerate(text.split("\n"), start=1) if needle in line]
    return hits[nth - 1]


HEAD = """[agent]
id = "cell-7"
site = "plant-a"
state_dir = "state"
"""

PLC = """
[[equipment]]
id = "{id}"
type = "plc"
driver = "modbus"
[equipment.connection]
host = "127.0.0.1"
port = {port}
[equipment.status]
tag = "{status_tag}"
[[equipment.tags]]
name = "state"
address = 0
[[equipment.tags]]
name = "speed"
table = "input"
address = 1
[[equipment.alerts]]
tag = "{alert_tag}"
above = 80.0
[[equipment.commands]]
name = "set_speed"
kind = "write"
tag = "{command_tag}"
"""


def plc(eid: str, port: str = "502", status_tag: str = "state", alert_tag: str = "state", command_tag: str = "state"):
    return PLC.format(id=eid, port=port, status_tag=status_tag, alert_tag=alert_tag, command_tag=command_tag)


def test_empty_file_is_located_at_line_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(tmp_path, "", capsys) == (2, ["agent: field required (line 1)"])


def test_missing_top_level_table_is_located_at_line_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(tmp_path, '\n\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n', capsys)
    assert (code, lines) == (2, ["agent: field required (line 1)"])


def test_missing_key_is_located_at_its_table_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + plc("plc-1").replace('[equipment.connection]\nhost = "127.0.0.1"\nport = 502\n', "")
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert lines == [f"equipment[plc-1].connection: field required (line {line_of(text, '[[equipment]]')})"]


def test_top_level_table_given_by_dotted_keys_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = '# a comment\nagent.id = "cell-7"\n'
    assert check(tmp_path, text, capsys) == (2, ["agent.site: field required (line 2)"])


def test_every_problem_in_one_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A type error in one equipment hides nothing: the cross-field checks of the others still run."""
    text = (
        HEAD.replace('site = "plant-a"', 'site = "plant a"')
        + '\n[mqtt]\nkeepalive_s = "often"\n'
        + plc("plc-1", status_tag="stat", alert_tag="temp", command_tag="speed")
        + plc("plc-2", port='"five-oh-two"')
        + plc("plc-3", port="99999")
    )
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    stat = 'tag = "stat"'
    assert lines == [
        f"agent.site: String should match pattern '^[A-Za-z0-9_-]+$' (line {line_of(text, 'site =')})",
        f"mqtt.keepalive_s: Input should be a valid integer, unable to parse string as an integer "
        f"(line {line_of(text, 'keepalive_s')})",
        f"equipment[plc-1].status.tag: unknown tag 'stat'; did you mean 'state'? (line {line_of(text, stat)})",
        f"equipment[plc-1].alerts[0].tag: unknown tag 'temp' (line {line_of(text, 'temp')})",
        # the driver's own check: a Modbus write needs a writable tag, and an input register is not
        f"equipment[plc-1].commands[0].tag: tag 'speed' is in the read-only input table "
        f"(line {line_of(text, 'speed', 3)})",
        f"equipment[plc-2].connection.port: Input should be a valid integer, unable to parse string as an integer "
        f"(line {line_of(text, 'five-oh-two')})",
        f"equipment[plc-3].connection.port: Input should be less than or equal to 65535 "
        f"(line {line_of(text, '99999')})",
    ], lines


def test_equipment_named_by_id_else_by_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = '"x"'
    text = HEAD + plc("plc-1", port=bad) + plc("bad id", port=bad) + plc("dup", port=bad) + plc("dup", port=bad)
    text += '\n[[equipment]]\ntype = "plc"\ndriver = "modbus"\n' + plc("0", port=bad)
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    ports = [line for line in lines if ".connection.port:" in line]
    assert [p.split(":")[0] for p in ports] == [
        "equipment[plc-1].connection.port",
        "equipment[1].connection.port",  # an invalid id names nothing
        "equipment[2].connection.port",  # nor does an id two equipment share
        "equipment[3].connection.port",
        "equipment[5].connection.port",  # an id that is a number would read as an index
    ], lines
    assert f"equipment[1].id: String should match pattern '^[A-Za-z0-9_-]+$' (line {line_of(text, 'bad id')})" in lines
    dup = line_of(text, "dup", 2)
    assert f"equipment[3].id: duplicate equipment id 'dup' (also equipment[2]) (line {dup})" in lines
    assert f"equipment[4].id: field required (line {line_of(text, '[[equipment]]', 5)})" in lines
    assert f"equipment[4].connection: field required (line {line_of(text, '[[equipment]]', 5)})" in lines


def test_unknown_key_names_the_near_miss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + plc("plc-1").replace("port = 502", "prot = 502")
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    prot = line_of(text, "prot")
    assert lines == [
        f"equipment[plc-1].connection.prot: unknown key; did you mean 'port'? (line {prot})",
    ], lines
    # at the top, in a section, and nothing suggested for a key close to no field
    text = HEAD.replace("[agent]", "[agnet]") + '\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\nkeepalive = 5\ncolour = 1\n'
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert lines == [
        "agnet: unknown key; did you mean 'agent'? (line 1)",
        "agent: field required (line 1)",
        f"mqtt.keepalive: unknown key; did you mean 'keepalive_s'? (line {line_of(text, 'keepalive')})",
        f"mqtt.colour: unknown key (line {line_of(text, 'colour')})",
    ], lines


def test_unknown_driver_names_the_near_miss(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + plc("plc-1").replace('driver = "modbus"', 'driver = "modbsu"')
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("equipment[plc-1].driver: unknown driver 'modbsu' (known: ")
    assert lines[0].endswith(f"; did you mean 'modbus'? (line {line_of(text, 'modbsu')})"), lines


def test_odd_keys_print_on_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + '"two\\nlines" = 1\n"a b" = 2\n'
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert lines == [
        f'agent."two\\nlines": unknown key (line {line_of(text, "two")})',
        f'agent."a b": unknown key (line {line_of(text, "a b")})',
    ], lines


def test_file_that_is_not_utf8_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(tmp_path, HEAD.encode() + b'\nname = "caf\xe9"\n', capsys)
    assert (code, lines) == (2, ["agent.toml: not UTF-8 text (line 6, column 12)"])


def test_deep_nesting_is_a_located_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + "deep = " + "[" * 5000 + "]" * 5000 + "\n"
    code, lines = check(tmp_path, text, capsys)
    assert (code, lines) == (2, ["agent.toml: values nested too deeply (line 5, column 8)"])


def test_syntax_error_at_end_of_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = check(tmp_path, HEAD + 'x = "open', capsys)
    assert code == 2 and len(lines) == 1
    assert re.fullmatch(r"agent\.toml: .+ \(line 5, column 10\)", lines[0]), lines


def test_run_logs_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = HEAD + plc("plc-1", alert_tag="temp") + plc("plc-2", port='"x"')
    code, expected = check(tmp_path, text, capsys)
    assert code == 2 and len(expected) == 2
    daemon = Daemon(tmp_path / "agent.toml").start(wait=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=GUARD_S) == 2
    assert [e["problem"] for e in daemon.logs() if e.get("event") == "config_invalid"] == expected


# ---- [mpm] auth needs its secret source ---------------------------------------------------------

MPM = '\n[mpm]\nbase_url = "http://127.0.0.1:8780/api/v1"\n'


@pytest.mark.parametrize(
    "section,needs",
    [
        ("", "auth = 'api_key' needs api_key_file or api_key_env"),  # api_key is the default mode
        ('auth = "api_key"\n', "auth = 'api_key' needs api_key_file or api_key_env"),
        ('auth = "bearer"\n', "auth = 'bearer' needs token_file or token_env"),
        (
            'auth = "oauth2"\n',
            "auth = 'oauth2' needs token_url and client_id and client_secret_file or client_secret_env",
        ),
        (
            'auth = "oauth2"\ntoken_url = "http://127.0.0.1:8780/oauth/token"\nclient_id = "edge"\n',
            "auth = 'oauth2' needs client_secret_file or client_secret_env",
        ),
        ('auth = "oauth2"\nclient_id = "edge"\nclient_secret_env = "X"\n', "auth = 'oauth2' needs token_url"),
    ],
)
def test_mpm_auth_mode_needs_its_secret_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], section: str, needs: str
) -> None:
    text = HEAD + MPM + section
    code, lines = check(tmp_path, text, capsys)
    assert code == 2
    assert lines == [f"mpm: {needs} (auth = 'none' for an MPM without credentials) (line {line_of(text, '[mpm]')})"]


@pytest.mark.parametrize(
    "section",
    [
        'auth = "none"\n',
        'auth = "api_key"\napi_key_env = "EDGE_AGENT_TEST_MPM"\n',
        'api_key_file = "mpm.key"\n',
        'auth = "bearer"\ntoken_file = "mpm.key"\n',
        'auth = "oauth2"\ntoken_url = "http://127.0.0.1:8780/oauth/token"\nclient_id = "edge"\n'
        'client_secret_env = "EDGE_AGENT_TEST_MPM"\n',
    ],
)
def test_mpm_auth_mode_with_its_secret_source_is_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, section: str
) -> None:
    monkeypatch.setenv("EDGE_AGENT_TEST_MPM", "k-123")
    (tmp_path / "mpm.key").write_text("k-456\n")
    code, lines = check(tmp_path, HEAD + MPM + section, capsys)
    assert code == 0, lines


def test_shipped_config_documents_its_limits_and_needs_no_mpm_credentials() -> None:
    text = (ROOT / "agent.toml").read_text()
    mpm = text.split("\n[mpm]")[1].split("\n[")[0]
    assert re.search(r'^auth = "none"\s+#', mpm, re.M), mpm
    assert re.search(r"^max_body_bytes = 8388608\s+# \S", mpm, re.M), mpm
    mqtt = text.split("\n[mqtt]")[1].split("\n[")[0]
    assert re.search(r"^replay_max_per_s = 2000\s+# \S", mqtt, re.M), mqtt


def test_the_edge_node_needs_its_own_client_id_and_topics_keep_out_of_its_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        HEAD
        + '[mqtt]\nprofiles = ["edge-agent", "sparkplug", "uns"]\n'
        + '[mqtt.sparkplug]\nclient_id = "edge-agent-cell-7"\n'
        + '[[equipment]]\nid = "m1"\ntype = "sensor"\ndriver = "file_drop"\nlocation = "spBv1.0/a"\n'
        + '[equipment.connection]\ndirectory = "in"\nprocessed_dir = "done"\nfailed_dir = "failed"\n'
    )
    code, out = check(tmp_path, text, capsys)
    assert code == 2
    clash = (
        "mqtt.sparkplug.client_id: 'edge-agent-cell-7' is the main connection's client id: give the edge node its own"
    )
    assert f"{clash} (line {line_of(text, 'client_id')})" in out
    where = "equipment[m1].location: spBv1.0 is the Sparkplug namespace, not a UNS location"
    assert f"{where} (line {line_of(text, 'location')})" in out
    code, out = check(tmp_path, text.replace("[mqtt]\n", '[mqtt]\ntopic_prefix = "spBv1.0/x"\n'), capsys)
    assert code == 2 and any("mqtt.topic_prefix: spBv1.0 is the Sparkplug namespace" in o for o in out), out
    # the default ids differ: the same file without the clashes passes
    fine = text.replace('client_id = "edge-agent-cell-7"\n', "").replace('"spBv1.0/a"', '"acme/a"')
    code, out = check(tmp_path, fine, capsys)
    assert code == 0, out

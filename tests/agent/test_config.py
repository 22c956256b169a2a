"""check-config: the shipped file is valid, and each kind of bad config names its path and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.cli import main
from peers import ROOT

SECRET = "s3cr3t-Value-never-printed"

GOOD = """[agent]
id = "cell-7"
site = "plant-a"
state_dir = "state"
driver_modules = ["scripted_driver"]

[mqtt]
url = "mqtt://127.0.0.1:1883"
username = "agent"
password_file = "mqtt.pw"

[[equipment]]
id = "press-1"
type = "cnc_mill"
driver = "scripted"
[equipment.connection]
script = "press.jsonl"
[equipment.status]
tag = "state"
map = { "0" = "idle", "1" = "running" }
[[equipment.tags]]
name = "state"
[[equipment.tags]]
name = "temp"
[[equipment.alerts]]
tag = "temp"
above = 80.0
[[equipment.commands]]
name = "set_speed"
kind = "write"
tag = "temp"
min = 0
max = 10
"""


def run_check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    (tmp_path / "mqtt.pw").write_text(SECRET + "\n")
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code = main(["check-config", "--config", str(path)])
    out = capsys.readouterr().out
    assert SECRET not in out
    return code, out.strip().splitlines()


def test_shipped_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "agent.toml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_good_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_check(tmp_path, GOOD, capsys)
    assert code == 0, lines


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


BAD = [
    # (name, edit, expected line prefix, needle for the expected line number)
    (
        "wrong type",
        ('site = "plant-a"', 'site = "plant-a"\nreconnect_max_s = "soon"'),
        "agent.reconnect_max_s: ",
        "reconnect_max_s",
    ),
    ("missing field", ('site = "plant-a"\n', ""), "agent.site: field required", "[agent]"),
    ("unknown key", ('url = "mqtt', 'colour = "blue"\nurl = "mqtt'), "mqtt.colour: unknown key", "colour"),
    (
        "unknown driver",
        ('driver = "scripted"', 'driver = "profibus"'),
        "equipment[press-1].driver: unknown driver 'profibus'",
        "profibus",
    ),
    (
        "bad url",
        ('url = "mqtt://127.0.0.1:1883"', 'url = "http://127.0.0.1:1883"'),
        "mqtt.url: must start with",
        "http://",
    ),
    (
        "bad url port",
        ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:99999"'),
        "mqtt.url: has an invalid port",
        "99999",
    ),
    (
        "duplicate equipment id",
        (
            "[[equipment.alerts]]",
            '[[equipment]]\nid = "press-1"\ndriver = "scripted"\n[equipment.connection]\nscript = "x"\n'
            "[[equipment.alerts]]",
        ),
        "equipment[1].id: duplicate equipment id",
        "[[equipment.alerts]]",
    ),
    ("bad id charset", ('id = "press-1"', 'id = "press 1"'), "equipment[0].id: String should match pattern", "press 1"),
    (
        "alert on unknown tag",
        ('tag = "temp"\nabove', 'tag = "tmep"\nabove'),
        "equipment[press-1].alerts[0].tag: unknown tag 'tmep'",
        "tmep",
    ),
    (
        "command on unknown tag",
        ('tag = "temp"\nmin', 'tag = "speed"\nmin'),
        "equipment[press-1].commands[0].tag: unknown tag 'speed'",
        '"speed"',
    ),
    (
        "unreadable secret file",
        ('password_file = "mqtt.pw"', 'password_file = "missing.pw"'),
        "mqtt.password_file: cannot read secret file",
        "missing.pw",
    ),
    (
        "unset secret variable",
        ('password_file = "mqtt.pw"', 'password_env = "EDGE_AGENT_TEST_UNSET_VAR"'),
        "mqtt.password_env: environment variable EDGE_AGENT_TEST_UNSET_VAR is not set",
        "UNSET_VAR",
    ),
    ("bad map status", ('"1" = "running"', '"1" = "sprinting"'), "equipment[press-1].status.map: ", "sprinting"),
    (
        "min above max",
        ("min = 0\nmax = 10", "min = 10\nmax = 0"),
        "equipment[press-1].commands[0]: min is greater than max",
        "[[equipment.commands]]",
    ),
    (
        "unknown command kind",
        ('kind = "write"', 'kind = "explode"'),
        "equipment[press-1].commands[0].kind: kind 'explode' is not supported",
        "explode",
    ),
]


@pytest.mark.parametrize("name,edit,prefix,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, edit: tuple[str, str], prefix: str, needle: str
) -> None:
    assert edit[0] in GOOD
    text = GOOD.replace(edit[0], edit[1], 1)
    code, lines = run_check(tmp_path, text, capsys)
    assert code == 2, lines
    hits = [line for line in lines if line.startswith(prefix)]
    assert hits, lines
    if name == "duplicate equipment id":
        assert any(line.startswith("equipment[1].id: duplicate equipment id 'press-1'") for line in lines), lines
        return
    m = re.search(r"\(line (\d+)\)$", hits[0])
    assert m, hits[0]
    expected = line_of(text, needle) if name != "missing field" else line_of(text, "[agent]")
    assert int(m.group(1)) == expected, (hits[0], expected)


def test_toml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('site = "plant-a"', "site = plant a")
    code, lines = run_check(tmp_path, text, capsys)
    assert code == 2
    assert len(lines) == 1 and re.fullmatch(r"agent\.toml: .+ \(line 3, column \d+\)", lines[0]), lines


def test_secret_value_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A secret-bearing key with a wrong type next to it: the output names paths, never the value.
    text = GOOD.replace('username = "agent"', f'username = "agent"\nkeepalive_s = "{SECRET}"')
    code, lines = run_check(tmp_path, text, capsys)
    assert code == 2 and lines and all(SECRET not in line for line in lines)


def test_empty_equipment_list_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run_check(tmp_path, GOOD.split("[[equipment]]")[0], capsys)
    assert code == 0, lines


def test_driver_modules_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_DRIVER_MODULES", "no_such_driver_module")
    code, lines = run_check(tmp_path, GOOD, capsys)
    assert code == 2 and any("cannot import driver module 'no_such_driver_module'" in line for line in lines), lines

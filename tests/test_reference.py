"""The generated reference, samples and schema: complete, fresh, and in agreement with check-config."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import jsonschema
import pytest

from agent.commission.models import all_sections, keys, meaning_of
from agent.commission.reference import render
from agent.commission.sample import sample
from agent.commission.schema import schema
from agent.config import parse_config
from agent.errors import ConfigError
from drivers.sdk.registry import builtin_drivers
from peers import ROOT

DOC = ROOT / "docs" / "configuration.md"


def test_every_model_field_is_in_the_generated_reference() -> None:
    """Every field of every section and driver has a row under its own heading (the file's freshness is
    the next test)."""
    text = render()
    missing = []
    for driver, table, model in all_sections():
        part = text if driver is None else text.split(f"## Driver `{driver}`")[1].split("\n## ")[0]
        section = part.split(f"### `{table}`\n")[1].split("\n### ")[0] if f"### `{table}`\n" in part else ""
        for name in model.model_fields:
            if f"| `{name}` |" not in section:
                missing.append(f"{driver or 'core'} {table} {name}")
    assert not missing, "missing from the generated reference: " + ", ".join(missing)


def test_every_field_has_a_meaning() -> None:
    """A new field needs a line: `Field(description=...)` or an entry in agent/commission/meanings*.py."""
    bare = [
        f"{model.__name__}.{name}"
        for _, _, model in all_sections()
        for name in model.model_fields
        if not meaning_of(model, name)
    ]
    assert not bare, bare


def test_the_committed_reference_is_current() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run python -m agent.commission.reference"


def test_reference_rows_carry_type_default_and_unit() -> None:
    rows = {(k.section, k.name): k for _, t, m in all_sections() for k in keys(t, m)}
    assert rows[("[equipment.connection]", "poll_interval_ms")].default == "1000"
    assert rows[("[equipment.connection]", "poll_interval_ms")].unit == "ms"
    assert rows[("[agent]", "id")].default == "required"
    assert '"N" | "E" | "O"' in rows[("[equipment.connection]", "parity")].type
    assert "byte_order" in DOC.read_text() and "serial_port" in DOC.read_text()


@pytest.mark.parametrize("drivers", [None, *[[d] for d in builtin_drivers()]])
def test_every_sample_passes_check_config(tmp_path: Path, drivers: list[str] | None) -> None:
    text = sample(drivers)
    cfg = parse_config(text, tmp_path / "agent.toml")
    assert len(cfg.equipment) == (len(drivers) if drivers else len(builtin_drivers()))
    # every optional key is there, commented out, with its default
    assert "# reconnect_max_s = 30.0" in text


def test_schema_validates_the_shipped_config_and_rejects_a_typo() -> None:
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    validator = jsonschema.Draft202012Validator(s)
    shipped = tomllib.loads((ROOT / "agent.toml").read_text())
    assert list(validator.iter_errors(shipped)) == []
    for path, key in (
        (("mqtt",), "qso"),
        (("equipment", 1, "connection"), "prot"),
        (("equipment", 0, "tags", 0), "nod"),
    ):
        bad = copy.deepcopy(shipped)
        target = bad
        for p in path:
            target = target[p]
        target[key] = 1
        errors = list(validator.iter_errors(bad))
        assert len(errors) == 1 and f"'{key}'" in errors[0].message, [e.message for e in errors]
        assert list(errors[0].absolute_path) == list(path)
        with pytest.raises(ConfigError):  # check-config agrees
            from agent.config import validate_data

            validate_data(bad, ROOT / "agent.toml", resolve_secrets=False)


def test_schema_knows_each_drivers_fields() -> None:
    validator = jsonschema.Draft202012Validator(schema())
    doc = tomllib.loads(sample(["modbus"]))
    doc["equipment"][0]["connection"]["endpoint"] = "opc.tcp://x:1"  # an OPC UA key on a Modbus device
    assert any("endpoint" in e.message for e in validator.iter_errors(doc))

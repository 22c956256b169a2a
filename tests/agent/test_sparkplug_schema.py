"""The committed generated module is the schema's: protoc run again on `sparkplug_b.proto` describes the same
messages (compared by the serialized file descriptor, which does not depend on the protoc version)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from agent.sparkplug import regenerate


def descriptor(module: Path) -> bytes:
    found = re.search(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)", module.read_text())
    assert found, module
    value = ast.literal_eval(found.group(1))
    assert isinstance(value, bytes)
    return value


def test_the_generated_module_matches_the_schema(tmp_path: Path) -> None:
    assert regenerate.generate(tmp_path) == 0
    assert descriptor(tmp_path / "sparkplug_b_pb2.py") == descriptor(regenerate.HERE / "sparkplug_b_pb2.py")

"""Tag scaling: an integer raw value gives the decimals of scale and offset; a float keeps its precision."""

from __future__ import annotations

import math
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import TagBase, parse_config
from agent.errors import ConfigError


def tag(scale: float | None = None, offset: float | None = None) -> TagBase:
    return TagBase(name="t", scale=scale, offset=offset)


@pytest.mark.parametrize(
    "raw,scale,offset,expected",
    [
        (825, 0.001, None, 0.825),  # not 0.8250000000000001
        (3, 0.1, None, 0.3),  # not 0.30000000000000004
        (655, 0.1, -40.0, 25.5),
        (-7, 0.01, 0.005, -0.065),
        (1, None, 0.1, 1.1),
        (12345, 0.0001, 1.2, 2.4345),
        (2**32 - 1, 0.001, None, 4294967.295),
        (0, 0.001, None, 0.0),
    ],
)
def test_integer_raw_gives_the_decimals_of_scale_and_offset(
    raw: int, scale: float | None, offset: float | None, expected: float
) -> None:
    value = tag(scale, offset).scaled(raw)
    assert isinstance(value, float)
    assert value == expected and repr(value) == repr(expected)


@given(
    raw=st.integers(min_value=-(2**31), max_value=2**32),
    digits=st.integers(min_value=-9999, max_value=9999),
    places=st.integers(min_value=0, max_value=6),
    offset=st.integers(min_value=-99999, max_value=99999),
)
def test_integer_raw_is_the_nearest_float_to_the_exact_decimal(raw: int, digits: int, places: int, offset: int) -> None:
    scale = float(f"{digits}e-{places}") or 1.0
    off = float(f"{offset}e-{places}")
    exact = Decimal(raw) * Decimal(repr(scale)) + Decimal(repr(off))
    assert tag(scale, off).scaled(raw) == float(exact)


def float32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


def test_float_raw_keeps_its_precision() -> None:
    raw = float32(23.4)  # 23.399999618530273: a float32 reading as the device sent it
    assert tag(1.0, 0.0).scaled(raw) == float("23.3999996185303")
    assert tag(0.1).scaled(float32(0.123456789)) == pytest.approx(0.0123456789, rel=1e-7)  # never rounded to 0.1
    assert tag(0.001).scaled(825.0) == 0.825  # binary noise of the multiply is dropped


@given(
    raw=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    scale=st.floats(min_value=1e-6, max_value=1e6),
    offset=st.floats(min_value=-1e6, max_value=1e6),
)
def test_float_raw_loses_nothing_beyond_noise(raw: float, scale: float, offset: float) -> None:
    plain = raw * scale + offset
    assert tag(scale, offset).scaled(raw) == pytest.approx(plain, rel=1e-14, abs=1e-300)


def test_non_finite_float_raw_passes_through() -> None:
    assert math.isnan(tag(0.1).scaled(math.nan))
    assert tag(0.1).scaled(math.inf) == math.inf


def test_unscaled_values_are_kept_as_they_are() -> None:
    assert tag().scaled(825) == 825 and isinstance(tag().scaled(825), int)
    assert tag(0.1).scaled(True) is True
    assert tag(0.1).scaled("text") == "text"
    assert tag(0.1).scaled(None) is None


@pytest.mark.parametrize("field,value", [("scale", "nan"), ("scale", "inf"), ("offset", "-inf"), ("scale", "0")])
def test_config_refuses_a_scale_or_offset_that_cannot_scale(tmp_path: Path, field: str, value: str) -> None:
    text = f"""[agent]
id = "cell-7"
site = "plant-a"

[[equipment]]
id = "plc-1"
driver = "modbus"
[equipment.connection]
host = "127.0.0.1"
[[equipment.tags]]
name = "t"
address = 0
{field} = {value}
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, tmp_path / "agent.toml")
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"equipment[plc-1].tags[0].{field}: "), info.value.problems
    assert info.value.problems[0].endswith("(line 13)")

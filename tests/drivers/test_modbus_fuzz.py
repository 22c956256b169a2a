"""Fuzz of the Modbus register codec against a decoding written here from the orders' definitions with
struct: any register words, every type, byte order, word order, string length and bit."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.model import Reading, utcnow
from drivers.modbus import MAX_REGISTERS, ModbusTag, coalesce, decode_registers, encode_registers
from drivers.modbus.driver import _decode

# The independent definitions: struct format and register count per type.
NUMBERS = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "int64": ("q", 4),
    "uint64": ("Q", 4),
    "float32": ("f", 2),
    "float64": ("d", 4),
}
ORDER = st.sampled_from(["big", "little"])
WORD = st.integers(0, 0xFFFF)


def swap16(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def reference(tag: dict[str, Any], regs: list[int]) -> Any:
    """The value the registers hold: words in word order (big = most significant first), each word's two
    bytes in byte order (big = high byte first); a bit counts from the least significant of the register
    read in its byte order; a string is its bytes in that layout, ASCII, trailing NULs dropped."""
    dtype, bo, wo = tag["type"], tag["byte_order"], tag["word_order"]
    if dtype == "bool":
        word = regs[0] if bo == "big" else swap16(regs[0])
        return bool((word >> tag["bit"]) & 1)
    words = regs[::-1] if wo == "little" else list(regs)
    data = b"".join(w.to_bytes(2, "big" if bo == "big" else "little") for w in words)
    if dtype == "string":
        return data.rstrip(b"\0").decode("ascii", errors="replace")
    return struct.unpack(">" + NUMBERS[dtype][0], data)[0]


def size(tag: dict[str, Any]) -> int:
    if tag["type"] == "string":
        return int(tag["length"])
    return 1 if tag["type"] == "bool" else NUMBERS[tag["type"]][1]


def assert_same(got: Any, want: Any, tag: dict[str, Any]) -> None:
    dtype = tag["type"]
    scale, offset = tag.get("scale"), tag.get("offset")
    if scale is not None or offset is not None:
        expect = float(want) * (1.0 if scale is None else scale) + (offset or 0.0)
        if math.isnan(expect):
            assert isinstance(got, float) and math.isnan(got), (got, want, tag)
            return
        # float32 is reported as its shortest decimal (7-9 digits), the rest exactly, before scaling
        tol = (1e-6 if dtype == "float32" else 1e-12) * (abs(float(want) * (scale or 1.0)) + abs(offset or 0.0))
        assert isinstance(got, float) and (got == expect or abs(got - expect) <= tol), (got, expect, tag)
        return
    if dtype == "float32":
        # the same float32 (the driver reports its shortest decimal), NaN as NaN
        assert isinstance(got, float), (got, tag)
        if math.isnan(want):
            assert math.isnan(got), (got, tag)
        else:
            assert struct.pack(">f", got) == struct.pack(">f", want), (got, want, tag)
        return
    if dtype == "float64" and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), (got, tag)
        return
    assert type(got) is type(want) and got == want, (got, want, tag)


@st.composite
def tags(draw: st.DrawFn, name: str = "t", address: int = 0) -> dict[str, Any]:
    """A register tag of any type and orders; numeric ones sometimes scaled."""
    dtype = draw(st.sampled_from([*NUMBERS, "bool", "string"]))
    tag: dict[str, Any] = {
        "name": name,
        "address": address,
        "type": dtype,
        "byte_order": draw(ORDER),
        "word_order": draw(ORDER),
    }
    if dtype == "bool":
        tag["bit"] = draw(st.integers(0, 15))
    elif dtype == "string":
        tag["length"] = draw(st.integers(1, MAX_REGISTERS))
    elif draw(st.integers(0, 3)) == 0:
        tag["scale"] = draw(st.floats(1e-6, 1e6) | st.floats(-1e6, -1e-6))
        tag["offset"] = draw(st.none() | st.floats(-1e6, 1e6))
    return tag


@given(st.data())
def test_decoding_any_words_matches_the_reference(data: st.DataObject) -> None:
    spec = data.draw(tags())
    regs = data.draw(st.lists(WORD, min_size=size(spec), max_size=size(spec)))
    tag = ModbusTag.model_validate(spec)
    assert_same(decode_registers(tag, regs), reference(spec, regs), spec)


@st.composite
def register_maps(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int]]:
    """Up to 12 tags at random addresses in 64 registers (overlapping ones too), and the registers."""
    specs = []
    for i in range(draw(st.integers(1, 12))):
        spec = draw(tags(f"t{i}", draw(st.integers(0, 63))))
        if spec["type"] == "string":
            spec["length"] = min(spec["length"], 8)
        specs.append(spec)
    image = draw(st.lists(WORD, min_size=64 + 8, max_size=64 + 8))
    return specs, image


@given(register_maps(), st.integers(0, 20))
def test_a_polled_block_decodes_every_tag_like_the_reference(
    case: tuple[list[dict[str, Any]], list[int]], max_gap: int
) -> None:
    """The poll path: tags coalesced into blocks, each block's bytes decoded in grouped struct calls."""
    specs, image = case
    tags_ = [ModbusTag.model_validate(s) for s in specs]
    got: dict[str, Any] = {}
    for block in coalesce("holding", tags_, max_gap, MAX_REGISTERS):
        raw = struct.pack(f">{block.count}H", *image[block.start : block.start + block.count])
        for event in _decode([(block, raw)], utcnow()):
            assert isinstance(event, Reading) and event.quality == "good"
            got[event.tag] = event.value
    assert set(got) == {s["name"] for s in specs}
    for spec in specs:
        regs = image[spec["address"] : spec["address"] + size(spec)]
        assert_same(got[spec["name"]], reference(spec, regs), spec)


values = (
    st.integers(-(2**70), 2**70)
    | st.integers(0, 400).map(lambda n: 10**n)
    | st.floats()
    | st.booleans()
    | st.sampled_from([None, "12", [1]])
)


@given(st.data(), values)
def test_encoding_any_value_round_trips_or_raises_value_error(data: st.DataObject, value: Any) -> None:
    spec = data.draw(tags())
    tag = ModbusTag.model_validate(spec)
    if spec["type"] not in NUMBERS:
        try:
            encode_registers(tag, value)
        except ValueError:
            return
        raise AssertionError(f"{spec['type']} encoded")
    try:
        regs = encode_registers(tag, value)
    except ValueError:
        return
    assert len(regs) == size(spec) and all(0 <= r <= 0xFFFF for r in regs)
    if spec.get("scale") is not None or spec.get("offset") is not None:
        return  # scaling rounds; its inverse is checked by the write tests
    back = reference(spec, regs)
    if spec["type"].startswith("float"):
        fmt = NUMBERS[spec["type"]][0]
        assert isinstance(value, (int, float))
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(back)
        else:
            assert struct.pack(">" + fmt, back) == struct.pack(">" + fmt, float(value)), (value, back, spec)
    else:
        assert back == value and isinstance(value, int | float), (value, back, spec)


def test_an_integer_beyond_any_float_is_a_value_error() -> None:
    """Found by the fuzz above: JSON carries integers of thousands of digits; float() overflows on them."""
    for spec in ({"type": "float64"}, {"type": "float32"}, {"type": "int16", "scale": 0.1}):
        tag = ModbusTag.model_validate({"name": "t", "address": 0, **spec})
        with pytest.raises(ValueError, match="out of range"):
            encode_registers(tag, 10**309)

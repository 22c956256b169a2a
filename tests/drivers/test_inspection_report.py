"""Parsing and scoring of dropped inspection reports (pure functions)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import DataError
from agent.model import json_bytes, parse_iso
from drivers.file_drop import file_timestamp, idempotency_key, parse_report

MTIME_NS = 1_764_259_200_123_456_789  # 2025-11-27T16:00:00.123Z
HEADER = "process_id,feature,nominal,measured,lower_tol,upper_tol,unit\n"


def parse(name: str, text: str | bytes, max_bytes: int | None = None) -> dict:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return parse_report(name, data, equipment_id="cmm-1", mtime_ns=MTIME_NS, max_bytes=max_bytes)


def error_of(name: str, text: str | bytes, max_bytes: int | None = None) -> str:
    with pytest.raises(DataError) as info:
        parse(name, text, max_bytes)
    return str(info.value)


# ---- CSV scoring --------------------------------------------------------------------------------


def test_csv_scores_defects_and_measurements() -> None:
    text = (
        HEADER
        + "J-1,bore,12.000,12.010,0,0.018,mm\n"  # in
        + "J-1,length,120.0,120.15,-0.1,0.1,mm\n"  # out by 0.05 of a 0.2 band: major
        + "J-1,width,60.0,59.55,-0.1,0.1,mm\n"  # out by 0.35 > 0.2: critical
        + "J-1,flatness,0,0.01,0,0.02,mm\n"  # in
    )
    r = parse("part7.csv", text)
    assert r["process_id"] == "J-1"
    assert r["equipment_id"] == "cmm-1"
    assert r["source"] == "file_drop:part7.csv"
    assert r["timestamp"] == "2025-11-27T16:00:00.123Z"
    assert r["quality_scores"] == {"dimensional": 0.5}
    assert r["overall_score"] == 0.5
    assert [(d["feature"], d["severity"]) for d in r["defects"]] == [("length", "major"), ("width", "critical")]
    length = r["defects"][0]
    assert length["measured"] == 120.15 and length["nominal"] == 120.0
    assert length["deviation"] == pytest.approx(0.15)
    assert r["defects"][1]["deviation"] == pytest.approx(-0.45)
    assert [m["in_tolerance"] for m in r["measurements"]] == [True, False, False, True]
    first = r["measurements"][0]
    assert first == {
        "feature": "bore",
        "nominal": 12.0,
        "measured": 12.01,
        "deviation": 0.01,
        "lower_tol": 0.0,
        "upper_tol": 0.018,
        "unit": "mm",
        "in_tolerance": True,
    }


def test_band_limits_are_inclusive_in_exact_decimals() -> None:
    # 10 + 0.05 and 10.05 - 10 are not exact in binary floating point; the limits must still hold.
    text = HEADER + "J,a,10,10.05,-0.05,0.05,mm\nJ,b,10,9.95,-0.05,0.05,mm\nJ,c,0.3,0.3,-0.1,0.0,mm\n"
    r = parse("limits.csv", text)
    assert all(m["in_tolerance"] for m in r["measurements"])
    assert r["defects"] == []
    assert r["overall_score"] == 1.0
    assert r["measurements"][0]["deviation"] == 0.05


def test_severity_boundary_outside_by_exactly_the_width_is_major() -> None:
    text = HEADER + "J,a,10,10.2,-0.1,0.1,mm\nJ,b,10,10.3000001,-0.1,0.1,mm\nJ,c,5,5.0001,0,0,mm\n"
    r = parse("sev.csv", text)
    assert [d["severity"] for d in r["defects"]] == ["major", "critical", "critical"]
    assert r["quality_scores"]["dimensional"] == 0.0


def test_csv_without_unit_column_any_order_bom_crlf_quotes_and_blank_lines() -> None:
    text = (
        "\ufeffFeature , Process_ID,nominal,measured,upper_tol,lower_tol\r\n"
        '"hole, left",JOB-9,5,5.01,0.02,-0.02\r\n'
        "\r\n"
        "hole right,JOB-9,5,5.05,0.02,-0.02\r\n"
        "\r\n"
    )
    r = parse("report.CSV", text)
    assert r["process_id"] == "JOB-9"
    assert [m["feature"] for m in r["measurements"]] == ["hole, left", "hole right"]
    assert r["measurements"][0]["unit"] is None
    assert r["defects"][0]["severity"] == "major"
    assert r["overall_score"] == 0.5


def test_scientific_and_signed_numbers() -> None:
    r = parse("s.csv", HEADER + "J,a,+1.5e1,15.001,-1E-2,+.01,mm\n")
    assert r["measurements"][0]["nominal"] == 15.0
    assert r["measurements"][0]["in_tolerance"] is True


# ---- CSV refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["part7.csv", "empty"]),
        ("  \n\n", ["part7.csv", "empty"]),
        (HEADER, ["part7.csv", "header only"]),
        (HEADER + "\n\n", ["header only"]),
        ("process_id,feature,nominal,measured,lower,upper_tol\nJ,a,1,1,0,0\n", ["row 1", "column 'lower'", "unknown"]),
        ("process_id,feature,nominal,measured,lower_tol\nJ,a,1,1,0\n", ["row 1", "column 'upper_tol'", "missing"]),
        (
            "process_id,feature,nominal,nominal,measured,lower_tol,upper_tol\n",
            ["row 1", "column 'nominal'", "duplicate"],
        ),
        ("process_id,feature,,nominal,measured,lower_tol,upper_tol\n", ["row 1", "column 3", "empty column name"]),
        ("process_id;feature;nominal;measured;lower_tol;upper_tol\nJ;a;1;1;0;0\n", ["row 1", "comma"]),
        (HEADER + "J,a,1,1,0,0,mm\nJ,b,1,abc,0,0,mm\n", ["part7.csv", "row 3", "column 'measured'", "'abc'"]),
        (HEADER + "J,a,1,1,0,0,mm\nJ,b,1,,0,0,mm\n", ["row 3", "column 'measured'", "empty value"]),
        (HEADER + "J,a,NaN,1,0,0,mm\n", ["row 2", "column 'nominal'", "not a number"]),
        (HEADER + "J,a,1,inf,0,0,mm\n", ["row 2", "column 'measured'"]),
        (HEADER + "J,a,1_000,1,0,0,mm\n", ["row 2", "column 'nominal'"]),
        (HEADER + "J,a,1,1,0,0,mm\nK,b,1,1,0,0,mm\n", ["row 3", "column 'process_id'", "'K'", "'J'"]),
        (HEADER + ",a,1,1,0,0,mm\n", ["row 2", "column 'process_id'", "empty"]),
        (HEADER + "J,,1,1,0,0,mm\n", ["row 2", "column 'feature'", "empty"]),
        (HEADER + "J,a,1,1,0.1,-0.1,mm\n", ["row 2", "column 'lower_tol'", "greater than upper_tol"]),
        (HEADER + "J,a,1,1,0\n", ["row 2", "column 'upper_tol'", "missing value"]),
        (HEADER + "J,a,1,1,0,0,mm,extra\n", ["row 2", "column 8", "extra field"]),
        (HEADER + 'J,"a,1,1,0,0,mm\n', ["malformed CSV"]),
    ],
)
def test_csv_refusals_name_file_row_and_column(text: str, expected: list[str]) -> None:
    message = error_of("part7.csv", text)
    for part in expected:
        assert part in message, (part, message)


def test_non_utf8_names_the_row() -> None:
    data = HEADER.encode() + b"J,a,1,1,0,0,mm\nJ,b\xff,1,1,0,0,mm\n"
    message = error_of("latin.csv", data)
    assert "latin.csv" in message and "row 3" in message and "UTF-8" in message and "0xff" in message


def test_over_max_bytes() -> None:
    message = error_of("big.csv", HEADER + "J,a,1,1,0,0,mm\n" * 100, max_bytes=200)
    assert "big.csv" in message and "max_file_bytes (200)" in message


# ---- JSON ---------------------------------------------------------------------------------------


def test_json_result_is_kept_and_filled_in() -> None:
    obj = {
        "process_id": "JOB-7",
        "quality_scores": {"dimensional": 0.9, "surface": 0.7},
        "defects": [{"feature": "edge", "measured": 1, "nominal": 0, "deviation": 1, "severity": "minor"}],
        "measurements": [],
        "operator": "anna",
    }
    r = parse("vision.json", json.dumps(obj))
    assert r["process_id"] == "JOB-7"
    assert r["overall_score"] == 0.7  # derived: the lowest category
    assert r["equipment_id"] == "cmm-1"
    assert r["source"] == "file_drop:vision.json"
    assert r["timestamp"] == file_timestamp(MTIME_NS)
    assert r["operator"] == "anna"
    assert r["defects"] == obj["defects"]


def test_json_keeps_what_the_file_says() -> None:
    obj = {
        "process_id": 42,
        "overall_score": 0.95,
        "quality_scores": {"dimensional": 0.5},
        "source": "vision:station-3",
        "equipment_id": "cam-3",
        "timestamp": "2025-11-27T17:00:00+01:00",
    }
    r = parse("v.JSON", json.dumps(obj))
    assert r["process_id"] == "42"
    assert r["overall_score"] == 0.95
    assert r["source"] == "vision:station-3"
    assert r["equipment_id"] == "cam-3"
    assert r["timestamp"] == "2025-11-27T16:00:00.000Z"
    assert r["defects"] == [] and r["measurements"] == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1, 2]", ["r.json", "array", "expected an object"]),
        ('"text"', ["a string"]),
        ('{"overall_score": 1}', ["r.json", "'process_id'", "missing"]),
        ('{"process_id": "", "overall_score": 1}', ["'process_id'", "non-empty"]),
        ('{"process_id": null, "overall_score": 1}', ["'process_id'", "null"]),
        ('{"process_id": "J",\n "overall_score": 1,}', ["r.json", "line 2", "column", "invalid JSON"]),
        ('{"process_id": "J", "overall_score": NaN}', ["NaN"]),
        ('{"process_id": "J"}', ["'overall_score'", "missing"]),
        ('{"process_id": "J", "overall_score": "high"}', ["'overall_score'", "a number"]),
        ('{"process_id": "J", "quality_scores": [1]}', ["'quality_scores'", "an object"]),
        ('{"process_id": "J", "quality_scores": {"dim": true}}', ["'quality_scores.dim'", "a boolean"]),
        ('{"process_id": "J", "overall_score": 1, "defects": {}}', ["'defects'", "a list"]),
        ('{"process_id": "J", "overall_score": 1, "measurements": [1]}', ["'measurements[0]'"]),
        ('{"process_id": "J", "overall_score": 1, "timestamp": "yesterday"}', ["'timestamp'", "yesterday"]),
        ('{"process_id": "J", "overall_score": 1, "source": 5}', ["'source'", "a string"]),
    ],
)
def test_json_refusals(text: str, expected: list[str]) -> None:
    message = error_of("r.json", text)
    for part in expected:
        assert part in message, (part, message)


# ---- keys and timestamps ------------------------------------------------------------------------


def test_key_depends_on_content_only() -> None:
    a = (HEADER + "J,a,1,1,0,0,mm\n").encode()
    assert idempotency_key(a) == idempotency_key(bytes(a))
    assert idempotency_key(a) != idempotency_key(a + b"\n")
    assert len(idempotency_key(a)) == 64


def test_file_timestamp_is_utc_with_milliseconds() -> None:
    ns = int(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC).timestamp() * 1e9)
    assert file_timestamp(ns) == "2026-01-02T03:04:05.678Z"
    assert file_timestamp(1_767_225_599_999_999_999) == "2025-12-31T23:59:59.999Z"


# ---- fuzzing: any bytes give a result or a DataError that names where -----------------------------

# Where a refusal may point: a CSV row, a JSON line/column or field path, or the whole file.
LOCATORS = ("row ", "line ", "field ", "the top level", "nests deeper", "file is empty", "max_file_bytes")


def outcome(name: str, data: bytes) -> dict[str, Any] | None:
    """Parse; a refusal must be a DataError naming the file and where; a result must be a sendable body."""
    try:
        result = parse_report(name, data, equipment_id="cmm-1", mtime_ns=MTIME_NS, max_bytes=16384)
    except DataError as err:
        message = str(err)
        assert message.startswith(f"{name}: "), message
        assert any(loc in message for loc in LOCATORS), message
        assert len(message) < 600, message  # quotes a value, never a whole file
        return None
    body = json.loads(json_bytes(result), parse_constant=lambda c: pytest.fail(f"{c} in the body"))
    assert isinstance(body["process_id"], str) and body["process_id"].strip()
    assert isinstance(body["overall_score"], (int, float)) and not isinstance(body["overall_score"], bool)
    assert parse_iso(body["timestamp"]).tzinfo is not None
    assert isinstance(body["defects"], list) and isinstance(body["measurements"], list)
    return result


PLAIN_NUMBERS = st.decimals(min_value=-1000, max_value=1000, places=4).map(str)
NUMBERS = st.one_of(
    PLAIN_NUMBERS,
    PLAIN_NUMBERS,
    st.sampled_from(["1e400", "-1e400", "1e-400", "1e999999999999999999", "9" * 400, ".5", "+1.", "1_0", "NaN", ""]),
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(alphabet="0123456789.eE+-", max_size=12),
)
CELLS = st.one_of(NUMBERS, st.text(max_size=12), st.sampled_from(["J", "a", "mm", '"', "\x00", ","]))


@st.composite
def scored_csv_reports(draw: st.DrawFn) -> bytes:
    """Well-formed reports whose numbers range over everything a number column may hold."""
    pid = draw(st.sampled_from(["J-1", " J-1 ", "42"]))
    rows = draw(
        st.lists(
            st.tuples(st.text(min_size=1, max_size=6), NUMBERS, NUMBERS, NUMBERS, NUMBERS).map(
                lambda r: ",".join([pid, '"' + r[0].replace('"', '""') + '"', *r[1:], "mm"])
            ),
            min_size=1,
            max_size=4,
        )
    )
    return "\n".join([HEADER.strip(), *rows]).encode("utf-8", "surrogatepass")


@st.composite
def csv_reports(draw: st.DrawFn) -> bytes:
    columns = draw(st.permutations(["process_id", "feature", "nominal", "measured", "lower_tol", "upper_tol", "unit"]))
    columns = draw(st.one_of(st.just(columns), st.lists(st.sampled_from([*columns, "x", ""]), max_size=8)))
    rows = draw(st.lists(st.lists(CELLS, min_size=max(len(columns) - 1, 0), max_size=len(columns) + 1), max_size=4))
    lines = [",".join(columns), *(",".join(row) for row in rows)]
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines).encode("utf-8", "surrogatepass")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("process_id", "overall_score", "quality_scores", "defects", "measurements", "timestamp", "source")
RAW = "\x00raw\x00"  # where a raw token goes in the encoded text


@st.composite
def json_reports(draw: st.DrawFn) -> bytes:
    obj = draw(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=5))
    if draw(st.integers(0, 3)):
        obj.setdefault("process_id", draw(st.text(max_size=6)))
        obj.setdefault("overall_score", draw(st.floats() | st.integers()))
    # Tokens a sloppy writer emits, placed as a value or anywhere; json.dumps itself writes NaN and Infinity.
    raw = draw(st.sampled_from(["NaN", "-Infinity", "1e400", "9" * 5000, '"\\ud800"', "[" * 70 + "]" * 70]))
    if draw(st.booleans()):
        obj[draw(st.sampled_from(FIELDS))] = RAW
    text = json.dumps(obj).replace(json.dumps(RAW), raw)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from([raw, ",", "}", '"'])) + text[at:]
    return text.encode()


@given(st.binary(max_size=300), st.sampled_from(["r.csv", "r.json"]))
def test_any_bytes_give_a_result_or_a_located_refusal(data: bytes, name: str) -> None:
    outcome(name, data)


@given(csv_reports() | scored_csv_reports())
def test_csv_reports_give_a_result_or_a_located_refusal(data: bytes) -> None:
    outcome("fuzz.csv", data)


@given(json_reports())
def test_json_reports_give_a_result_or_a_located_refusal(data: bytes) -> None:
    outcome("fuzz.json", data)


def test_body_limit_is_the_outbox_body_size() -> None:
    text = HEADER + "J,a,1,1,0,0,mm\n"
    size = len(json_bytes(parse("s.csv", text)))
    assert parse_report("s.csv", text.encode(), equipment_id="cmm-1", mtime_ns=MTIME_NS, max_result_bytes=size)
    with pytest.raises(DataError) as info:
        parse_report("s.csv", text.encode(), equipment_id="cmm-1", mtime_ns=MTIME_NS, max_result_bytes=size - 1)
    assert str(info.value).startswith(f"s.csv: the quality result is {size} bytes as JSON")
    assert f"max_body_bytes ({size - 1})" in str(info.value)

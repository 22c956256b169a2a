"""The one place JSON is written (drivers.sdk.jsonio): broker messages stay ASCII JSON whatever the text,
the outbox's UTF-8 bytes stay as they were, and the NaN policy is the same for both."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.ratelimit import TokenBucket
from drivers.sdk.jsonio import json_bytes, json_safe, message_bytes, value_text

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8
)


@given(scalars)
def test_a_scalar_is_ascii_json_with_non_finite_floats_as_strings(value: Any) -> None:
    text = value_text(value)
    assert text.isascii()
    assert json.loads(text) == json_safe(value)
    if isinstance(value, float) and not math.isfinite(value):
        assert json.loads(text) in ("NaN", "Infinity", "-Infinity")


@given(values)
def test_a_message_is_compact_ascii_json_and_decodes_to_its_safe_form(value: Any) -> None:
    data = message_bytes({"v": value})
    assert data.isascii()
    assert json.loads(data) == {"v": json_safe(value)}


@given(st.dictionaries(st.text(), st.text() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)))
def test_a_plain_message_is_written_as_json_dumps_writes_it(payload: dict[str, Any]) -> None:
    assert message_bytes(payload) == json.dumps(payload, separators=(",", ":")).encode()


def test_a_lone_surrogate_still_encodes_for_the_broker() -> None:
    text = json.loads('"\\ud800"')
    assert value_text(text) == '"\\ud800"'
    assert message_bytes({"id": text}) == b'{"id":"\\ud800"}'


@given(values)
def test_outbox_bytes_are_utf8_json_as_before(value: Any) -> None:
    try:
        expected = json.dumps(json_safe(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        return  # a lone surrogate: json_bytes raises as it always did
    assert json_bytes(value) == expected


def test_a_spend_beyond_the_tokens_leaves_none_and_the_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, burst=2.0, clock=lambda: now[0])
    bucket.spend()
    bucket.spend()
    bucket.spend()
    assert bucket.tokens == 0.0
    assert bucket.wait_s() == 0.5
    now[0] = 0.25
    assert bucket.tokens == 0.5
    now[0] = 10.0
    assert bucket.tokens == 2.0

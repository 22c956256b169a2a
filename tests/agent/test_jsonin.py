"""The one gate for outside JSON: limits refused with a reason, never a library exception."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.jsonin import MAX_DEPTH, InputError, depth, loads


def test_deep_nesting_refused_without_recursion() -> None:
    for text in ("[" * 10_000 + "]" * 10_000, '{"a":' * 10_000 + "1" + "}" * 10_000, "[" * 100_000):
        with pytest.raises(InputError) as err:
            loads(text, what="command payload")
        assert err.value.reason == "too_deep"
        assert "command payload" in str(err.value)


def test_limit_is_exactly_64() -> None:
    assert depth(loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)) == MAX_DEPTH
    with pytest.raises(InputError):
        loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    # Brackets inside strings do not count.
    assert loads(json.dumps({"s": "[" * 1000})) == {"s": "[" * 1000}


def test_size_utf8_constants() -> None:
    with pytest.raises(InputError) as err:
        loads(b"{}" * 100, max_bytes=10, what="body")
    assert err.value.reason == "too_large" and "200 bytes" in str(err.value)
    with pytest.raises(InputError, match="not UTF-8"):
        loads(b'{"a": "\xff\xfe"}')
    with pytest.raises(InputError, match="not valid JSON"):
        loads("[NaN]")
    with pytest.raises(InputError, match="line 1, column"):
        loads("{")


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_refuse(data: bytes) -> None:
    try:
        loads(data, max_bytes=200)
    except InputError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_valid_documents_round_trip(doc: object) -> None:
    text = json.dumps(doc)
    if depth(doc) <= MAX_DEPTH:
        assert loads(text) == doc

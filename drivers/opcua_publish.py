"""The Publish-response decoder moved to `drivers.opcua.publish`; this module stays for one release so that
code importing it keeps working."""

from __future__ import annotations

from drivers.opcua.publish import (
    NO_VALUE_STATUS,
    OVERFLOW,
    OVERFLOW_MASK,
    DataChanges,
    Item,
    PublishDecodeError,
    decode_publish_response,
    install,
    items_of,
    overflowed_handles,
)

__all__ = [
    "NO_VALUE_STATUS",
    "OVERFLOW",
    "OVERFLOW_MASK",
    "DataChanges",
    "Item",
    "PublishDecodeError",
    "decode_publish_response",
    "install",
    "items_of",
    "overflowed_handles",
]

"""OPC UA (asyncua): one subscription per equipment, notifications taken in whole batches, security,
writes and method calls.

`config` has the models and the node-id grammar, `convert` turns values into readings and parameters into
variants, `security` sets up certificates and users and explains failed connects, `subscription` runs the
monitored items and their queues, `publish` decodes Publish responses from the bytes, `driver` is the
`OpcUaDriver`; `sim` is the simulated machine (see README.md). The names the single-module driver and
`drivers.opcua_publish` exported stay importable from here.
"""

from __future__ import annotations

from drivers.opcua.config import METHOD_KINDS, NODE_RE, OpcUaCommand, OpcUaConnection, OpcUaTag, check_node_id
from drivers.opcua.convert import coerce, plain, quality_of
from drivers.opcua.driver import ASYNCUA_LOGGER, OpcUaDriver
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
from drivers.opcua.subscription import (
    EXCEPTION_SAMPLING_MS,
    LATE_PUBLISH_MS,
    MAX_QUEUE_SIZE,
    MIN_QUEUE_SIZE,
    OVERFLOW_QUIET_S,
    STATUS_QUEUE_SIZE,
    derived_queue_size,
)

__all__ = [
    "ASYNCUA_LOGGER",
    "EXCEPTION_SAMPLING_MS",
    "LATE_PUBLISH_MS",
    "MAX_QUEUE_SIZE",
    "METHOD_KINDS",
    "MIN_QUEUE_SIZE",
    "NODE_RE",
    "NO_VALUE_STATUS",
    "OVERFLOW",
    "OVERFLOW_MASK",
    "OVERFLOW_QUIET_S",
    "STATUS_QUEUE_SIZE",
    "DataChanges",
    "Item",
    "OpcUaCommand",
    "OpcUaConnection",
    "OpcUaDriver",
    "OpcUaTag",
    "PublishDecodeError",
    "check_node_id",
    "coerce",
    "decode_publish_response",
    "derived_queue_size",
    "install",
    "items_of",
    "overflowed_handles",
    "plain",
    "quality_of",
]

"""The MTConnect driver: machine tools (CNC mills and lathes, laser cutters, robots) through an MTConnect
agent's HTTP interface, read-only. See README.md."""

from __future__ import annotations

from drivers.mtconnect.config import MTConnectConnection, MTConnectTag
from drivers.mtconnect.driver import MTConnectDriver

__all__ = ["MTConnectConnection", "MTConnectDriver", "MTConnectTag"]

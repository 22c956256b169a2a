"""The gate for outside JSON lives in the driver SDK (drivers/sdk/jsonio.py); this name stays for one release."""

from __future__ import annotations

from drivers.sdk.jsonio import MAX_DEPTH, InputError, depth, loads

__all__ = ["MAX_DEPTH", "InputError", "depth", "loads"]

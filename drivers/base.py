"""The driver interface now lives in the driver SDK (`drivers.sdk`); this module stays for one release so
that plants' `driver_modules` written against it keep loading."""

from __future__ import annotations

from drivers.sdk.driver import (
    Driver,
    DriverContext,
    PollingDriver,
    refuse_unknown,
    validate_write,
)

__all__ = ["Driver", "DriverContext", "PollingDriver", "refuse_unknown", "validate_write"]

"""The driver registry now lives in the driver SDK (`drivers.sdk.registry`); this module stays for one
release so that plants' `driver_modules` written against it keep loading."""

from __future__ import annotations

from drivers.sdk.registry import get_driver, known_drivers, register_driver

__all__ = ["get_driver", "known_drivers", "register_driver"]

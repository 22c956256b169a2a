"""Network address checks shared by drivers' connection models and the core's config sections."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field

Port = Annotated[int, Field(ge=1, le=65535)]


def check_url(value: str, schemes: tuple[str, ...], shape: str | None = None) -> str:
    """`value` as a URL with one of `schemes`, a host and (if given) a valid port; else ValueError.

    `shape` ("must be opc.tcp://host:port") replaces the messages for a wrong scheme or a missing host.
    """
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(shape or f"must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError(shape or "has no host")
    try:
        _ = parts.port
    except ValueError as err:
        raise ValueError("has an invalid port") from err
    return value

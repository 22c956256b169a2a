"""Network address checks shared by drivers' connection models and the core's config sections."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field

Port = Annotated[int, Field(ge=1, le=65535)]


def check_url(value: str, schemes: tuple[str, ...]) -> str:
    """`value` as a URL with one of `schemes`, a host and (if given) a valid port; else ValueError."""
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        _ = parts.port
    except ValueError as err:
        raise ValueError("has an invalid port") from err
    return value

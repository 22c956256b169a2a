"""MTConnect config models: `[equipment.connection]` (the agent and how it is polled) and tags."""

from __future__ import annotations

from pydantic import Field, field_validator

from drivers.sdk import Model, TagBase, check_url


class MTConnectConnection(Model):
    """`[equipment.connection]` of an MTConnect equipment: an agent's HTTP base and one of its devices."""

    url: str  # the agent's base, e.g. http://10.0.0.5:5000 (requests go to <url>/<device>/probe, ...)
    device: str | None = Field(None, min_length=1, max_length=256)  # name or uuid; optional for one device
    poll_interval_ms: int = Field(1000, ge=10, le=3_600_000)
    count: int = Field(1000, ge=1, le=1_000_000)  # observations per /sample request
    timeout_s: float = Field(10.0, gt=0, le=600)
    # The data item (id or name) whose value is the status's process_id; default: the first PART_ID.
    process_id_item: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v, ("http", "https"), "must be http://host[:port][/path] or https://...").rstrip("/")


class MTConnectTag(TagBase):
    """A tag is one data item, by its id or, failing that, its name."""

    item: str = Field(min_length=1, max_length=256)

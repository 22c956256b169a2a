"""OPC UA config models (`[equipment.connection]`, tags, commands) and the node-id grammar, `nsu=` included."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from asyncua import ua
from pydantic import Field, field_validator, model_validator

from drivers.sdk import CommandBase, SecretHolder, TagBase, check_url

NODE_RE = re.compile(r"^(?:nsu=(?P<uri>[^;]+);|ns=(?P<ns>\d+);)?(?P<kind>[isgb])=(?P<ident>.+)$", re.DOTALL)
# `reset` is a method call too, the one command the daemon lets run while the equipment is in error.
METHOD_KINDS = ("method", "reset")


def check_node_id(text: str) -> str:
    """Validate `ns=2;s=X`, `i=85`, `nsu=urn:x;s=X` (also g= and b=); return it unchanged."""
    m = NODE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a node id (ns=<index>;s=<name>, i=, g=, b=, or nsu=<uri>;s=<name>)")
    try:
        ua.NodeId.from_string(f"ns={m['ns'] or 0};{m['kind']}={m['ident']}")
    except Exception as err:
        raise ValueError(f"{text!r} is not a valid node id: {err}") from None
    return text.strip()


def resolve_node_id(text: str, namespaces: list[str]) -> ua.NodeId:
    """A validated node id against the server's namespace array: `nsu=` finds its index by URI.

    Raises LookupError naming the URI when the server has no such namespace.
    """
    m = NODE_RE.match(text)
    assert m is not None  # validated by the config model
    if m["uri"] is not None:
        try:
            index = namespaces.index(m["uri"])
        except ValueError:
            raise LookupError(f"namespace {m['uri']} is not on the server") from None
    else:
        index = int(m["ns"] or 0)
    return ua.NodeId.from_string(f"ns={index};{m['kind']}={m['ident']}")


class OpcUaConnection(SecretHolder):
    """`[equipment.connection]` of an OPC UA equipment."""

    __secrets__ = ("password",)
    endpoint: str
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] | None = None
    certificate_file: Path | None = None
    private_key_file: Path | None = None
    server_certificate_file: Path | None = None
    application_uri: str | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    publishing_interval_ms: float = Field(100.0, gt=0)
    timeout_s: float = Field(4.0, gt=0)
    watchdog_interval_s: float = Field(1.0, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        return check_url(v, ("opc.tcp",), "must be opc.tcp://host:port")

    @model_validator(mode="after")
    def _security(self) -> OpcUaConnection:
        if self.security_policy == "None":
            if self.security_mode not in (None, "None"):
                raise ValueError(f"security_mode {self.security_mode} needs security_policy Basic256Sha256")
        elif self.security_mode == "None":
            raise ValueError("security_policy Basic256Sha256 needs security_mode Sign or SignAndEncrypt")
        if (self.certificate_file is None) != (self.private_key_file is None):
            raise ValueError("give certificate_file and private_key_file together (or neither, to generate them)")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("a password needs a username")
        return self

    @property
    def mode(self) -> str:
        """The effective message security mode."""
        if self.security_policy == "None":
            return "None"
        return self.security_mode or "SignAndEncrypt"

    @property
    def secure(self) -> bool:
        return self.security_policy != "None"


class OpcUaTag(TagBase):
    """An OPC UA tag: a variable node, monitored in the equipment's subscription."""

    node: str
    # Unset: 0, the server's fastest (on change where it can).
    sampling_interval_ms: float | None = Field(None, ge=0)
    # Unset: derived from the intervals the server revised (derived_queue_size).
    queue_size: int | None = Field(None, ge=1)

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return check_node_id(v)


class OpcUaCommand(CommandBase):
    """`write` (a tag), `method` or `reset` (`object` + `method` node ids), or `load_process`."""

    object: str | None = None
    method: str | None = None

    @field_validator("object", "method")
    @classmethod
    def _node(cls, v: str | None) -> str | None:
        return None if v is None else check_node_id(v)

    @model_validator(mode="after")
    def _fields(self) -> OpcUaCommand:
        if self.kind == "write" and not self.tag:
            raise ValueError("a write command needs a tag")
        if self.kind in METHOD_KINDS and not (self.object and self.method):
            raise ValueError(f"a {self.kind} command needs object and method node ids")
        if self.kind not in METHOD_KINDS and (self.object or self.method):
            raise ValueError("object and method belong to method and reset commands")
        return self

"""Who is calling the HTTP API: API keys and roles.

Keys come from `[[http.api_keys]]` and are compared in constant time; roles are viewer < operator <
admin (`agent.command_rules`). With no keys configured, a loopback caller is an anonymous viewer: it
may read, and is told that commands need a key. Wrong and malformed keys are 401; the throttle that
counts them per address is the API's (`agent.http`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web

from agent.command_rules import Forbidden, check_role
from agent.config import ApiKey, Role
from agent.http_errors import ApiError

KEY_TEXT = re.compile(r"[\x21-\x7e]{1,512}")  # a key is visible ASCII, as RFC 6750 tokens are


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the key's name and role (or the anonymous loopback reader)."""

    name: str
    role: Role


ANONYMOUS = Caller("anonymous-loopback", "viewer")  # a loopback caller while no keys are configured
CALLER_KEY = web.RequestKey("caller", Caller)  # who the API's middleware identified


def is_loopback(remote: str | None) -> bool:
    """Whether a request's remote address is a loopback one (an IPv6 zone is ignored)."""
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


def _digest(key: str | bytes) -> bytes:
    """Keys are compared as fixed-length digests, so the comparison says nothing about length or content."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def presented_key(request: web.Request) -> str | None:
    """The key the request carries, None without one; ValueError names what is malformed."""
    auth = request.headers.get("Authorization")
    api_key = request.headers.get("X-API-Key")
    if auth is not None:
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer":
            raise ValueError("the Authorization header must be 'Bearer <key>'")
        what = "the Authorization header's key"
    elif api_key is not None:
        key, what = api_key, "the X-API-Key header"
    else:
        return None
    key = key.strip(" \t")
    if not KEY_TEXT.fullmatch(key):
        raise ValueError(f"{what} must be 1 to 512 visible ASCII characters")
    return key


def identify(request: web.Request, keys: Sequence[ApiKey]) -> Caller | None:
    """The caller the presented key belongs to, None without a key; 401 for a wrong or malformed key."""
    try:
        presented = presented_key(request)
    except ValueError as err:
        raise ApiError(401, "unauthorized", str(err), "auth") from None
    if presented is None:
        return None
    return caller_of(presented, keys)


def caller_of(presented: str, keys: Sequence[ApiKey]) -> Caller:
    """The caller a key belongs to (a WebSocket's auth message, a header's key); 401 for a wrong key."""
    if not KEY_TEXT.fullmatch(presented):
        raise ApiError(401, "unauthorized", "a key must be 1 to 512 visible ASCII characters", "auth")
    given = _digest(presented)
    match: Caller | None = None
    for k in keys:
        secret = k.secret("key")
        # Every key is compared, each in constant time, so timing says nothing about which matched.
        if secret and hmac.compare_digest(_digest(secret), given) and match is None:
            match = Caller(k.name, k.role)
    if match is None:
        raise ApiError(401, "unauthorized", "unknown API key", "auth")
    return match


def authenticate(request: web.Request, keys: Sequence[ApiKey]) -> Caller:
    """The caller the API's middleware identified (`CALLER_KEY`), or `ANONYMOUS` for a loopback
    caller while no keys are configured; 401 when a key is needed and none was given."""
    caller = request.get(CALLER_KEY)
    if caller is not None:
        return caller
    if keys or not is_loopback(request.remote):
        raise ApiError(401, "unauthorized", "an API key is required (Authorization: Bearer or X-API-Key)", "auth")
    return ANONYMOUS


def refused(caller: Caller, err: Forbidden) -> ApiError:
    """The 403 answer to a role refusal; the anonymous reader is told that it needs a key."""
    message = "commands need an API key; none is configured" if caller is ANONYMOUS else str(err)
    return ApiError(403, "forbidden", message, "auth")


def grant(caller: Caller, role: Role) -> Caller:
    """`caller` if it has at least `role`; 403 otherwise."""
    try:
        check_role(caller.role, role)
    except Forbidden as err:
        raise refused(caller, err) from None
    return caller

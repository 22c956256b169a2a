"""How the MPM client proves who it is: no credentials, an API key, a bearer token or OAuth2 client
credentials (a token fetched, cached and refreshed ahead of its expiry)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Literal

import aiohttp

from agent.metrics import MPM_CALLS
from agent.mpm_models import CredentialsRefused, MPMTransientError, answer_reason, read_answer
from agent.mpm_retry import RETRY_STATUSES, retry_after

AuthMode = Literal["none", "api_key", "bearer", "oauth2"]


class MpmAuth:
    """The credentials of one client and the headers that carry them; secrets stay in here."""

    def __init__(
        self,
        mode: AuthMode,
        session: Callable[[], aiohttp.ClientSession],
        *,
        api_key: str | None = None,
        bearer_token: str | None = None,
        token_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        scope: str | None = None,
    ) -> None:
        if mode not in ("none", "api_key", "bearer", "oauth2"):
            raise ValueError(f"unknown MPM auth mode {mode!r} (none, api_key, bearer or oauth2)")
        if mode == "oauth2" and not (token_url and client_id):
            raise ValueError("MPM auth oauth2 needs token_url and client_id")
        if mode == "bearer" and not bearer_token:
            raise ValueError("MPM auth bearer needs a token")
        self.mode = mode
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self._session = session
        self._api_key = api_key
        self._bearer_token = bearer_token
        self._client_secret = client_secret
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock: asyncio.Lock | None = None

    def redact(self, text: str) -> str:
        """Remove every configured secret from a text that may end up in a log or an exception."""
        for secret in (self._api_key, self._bearer_token, self._client_secret, self._token):
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    def forget_token(self) -> None:
        """Drop the cached OAuth2 token (MPM answered 401: revoked or expired early)."""
        self._token = None

    async def headers(self) -> dict[str, str]:
        """The headers that carry the credentials; an OAuth2 token is fetched when none is cached."""
        if self.mode == "none":
            return {}
        if self.mode == "api_key":
            return {"X-API-Key": self._api_key} if self._api_key else {}
        if self.mode == "bearer":
            return {"Authorization": f"Bearer {self._bearer_token}"}
        token = await self._oauth_token()
        return {"Authorization": f"Bearer {token}"}

    async def _oauth_token(self) -> str:
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
            await self._fetch_token()
            assert self._token is not None
            return self._token

    async def _fetch_token(self) -> None:
        """Client credentials grant; the token is refreshed ahead of its expiry."""
        assert self.token_url is not None
        form = {"grant_type": "client_credentials", "client_id": self.client_id or ""}
        if self._client_secret:
            form["client_secret"] = self._client_secret
        if self.scope:
            form["scope"] = self.scope
        try:
            async with self._session().post(self.token_url, data=form) as resp:
                text = await resp.text()
                status = resp.status
                wait = retry_after(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError) as err:
            MPM_CALLS.labels(call="oauth_token", outcome="network").inc()
            raise MPMTransientError(f"MPM token endpoint unreachable: {type(err).__name__}") from err
        body = read_answer(text, "MPM token endpoint answer")
        if status in RETRY_STATUSES or status >= 500:
            MPM_CALLS.labels(call="oauth_token", outcome="transient").inc()
            raise MPMTransientError(f"MPM token endpoint answered {status}", status, wait)
        if status != 200:
            # Whatever the token endpoint refuses is the configuration's fault, never one item's.
            MPM_CALLS.labels(call="oauth_token", outcome="credentials_refused").inc()
            reason = self.redact(answer_reason(body, text))
            raise CredentialsRefused(f"MPM token endpoint refused the client credentials ({status}): {reason}", status)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            MPM_CALLS.labels(call="oauth_token", outcome="malformed").inc()
            raise MPMTransientError("MPM token endpoint answer has no access_token", status)
        MPM_CALLS.labels(call="oauth_token", outcome="ok").inc()
        self._token = body["access_token"]
        try:
            lifetime = float(body.get("expires_in") or 3600)
        except (TypeError, ValueError):
            lifetime = 3600.0
        # Refresh ahead of expiry by a tenth of the lifetime, at most 60 s.
        self._token_expires = time.monotonic() + max(0.0, lifetime - min(60.0, lifetime * 0.1))

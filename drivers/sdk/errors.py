"""The error hierarchy shared by the core and drivers: transient (retry), data (skip and count), rejected
(dead-letter), configuration and command refusals."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the daemon raises on purpose."""


class TransientError(AgentError):
    """A peer is unreachable or busy; the caller retries with backoff."""


class DataError(AgentError):
    """Input that cannot be used (a malformed file, message or value); skipped and counted."""


class RejectedError(AgentError):
    """A peer refused the request for good (a final 4xx); the item becomes a dead letter."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ConfigError(AgentError):
    """The configuration is invalid; carries one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class CommandError(AgentError):
    """A command was refused; `reason` is a short machine-readable word, the message says why.

    `http_status` is what the local HTTP API answers for it (422 bad parameters or a device refusal,
    409 the equipment's state does not allow it now, 404 unknown equipment or command).
    """

    def __init__(self, message: str, reason: str = "invalid", http_status: int = 422) -> None:
        super().__init__(message)
        self.reason = reason
        self.http_status = http_status

"""The running config, in one place: components read `holder.cfg` when they need it, so a reload
(SIGHUP) replaces it once instead of being copied into every component."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import AgentConfig

Listener = Callable[[AgentConfig, AgentConfig], None]


class ConfigHolder:
    """Holds the current `AgentConfig`; listeners hear of a reload and return their own unsubscribe."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self._listeners: list[Listener] = []

    def replace(self, new: AgentConfig) -> None:
        """A reload: the new config is current from now on; listeners get (old, new)."""
        old, self.cfg = self.cfg, new
        for listener in list(self._listeners):
            listener(old, new)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(old, new)` on every reload; returns the call that stops it."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

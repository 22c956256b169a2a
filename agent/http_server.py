"""The HTTP API's listening side: sockets accepted here, not by asyncio, within the `[http]` limits.

A connection cap, a header timeout, an idle timeout (aiohttp's keep-alive) and a reserve of descriptors
for the rest of the daemon; accepting pauses while descriptors are short. aiohttp serves each accepted
connection; this module never looks at a request's content.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from agent.config import HttpSection

log = structlog.get_logger("edge_agent.http")

ACCEPT_BATCH = 64  # connections taken per wake-up of a listening socket
ACCEPT_RETRY_S = 1.0  # how long accepting pauses while descriptors are short
BACKLOG = 128


class _PeerFaults(logging.Filter):
    """aiohttp logs a traceback for every malformed request it answers with 400 itself. That is the peer's
    fault, not the daemon's: it becomes one debug line, so a stream of garbage cannot flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            log.debug("http_bad_request", error=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            return False
        return True


# The logger handed to aiohttp's request handlers in place of its own "aiohttp.server".
_server_log = logging.getLogger("edge_agent.http.server")
_server_log.addFilter(_PeerFaults())


def descriptor_budget(max_connections: int) -> tuple[int, int]:
    """(connection cap, descriptor ceiling) under the process's open-file limit.

    A quarter of the descriptors (at least 16) is kept for everything else the daemon opens (broker,
    MPM, equipment links, the store), so the cap is at most the other three quarters; an accepted
    connection whose descriptor number reaches the ceiling shows that descriptors are short, however
    they were spent (the kernel hands out the lowest free number).
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        soft = 1 << 20
    ceiling = soft - max(16, soft // 4)
    return max(1, min(max_connections, ceiling)), ceiling


def _descriptors_in_use() -> int:
    """How many descriptors the process has open (0 where /proc does not tell)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@contextmanager
def serving(request: web.Request) -> Iterator[None]:
    """While a request is served its connection has no header deadline; the next request gets a new one."""
    conn = request.transport.get_protocol() if request.transport is not None else None
    if not isinstance(conn, _Conn):
        yield
        return
    conn.request_started()
    try:
        yield
    finally:
        conn.request_done()


class _Conn(asyncio.Protocol):
    """One accepted connection: aiohttp's request handler inside, the header deadline around it.

    The deadline runs from the connection's start, and again from the first byte after an answer, until
    a request's headers are complete (the API middleware then enters `serving`); a connection that is
    too slow is closed without an answer. Idle time between requests is aiohttp's keep-alive.
    """

    def __init__(self, listener: Listener, inner: asyncio.Protocol) -> None:
        self.listener = listener
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.busy = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._deadline is None:
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.listener.conns.discard(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def request_started(self) -> None:
        """A request's headers are complete: no deadline while it is served."""
        self.busy = True
        self._disarm()

    def request_done(self) -> None:
        """Answered: the next request's headers get a new deadline from their first byte."""
        self.busy = False

    def _arm(self) -> None:
        self._disarm()
        self._deadline = asyncio.get_running_loop().call_later(self.listener.cfg.header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.busy and self.transport is not None:
            log.debug("http_header_timeout", peer=self.transport.get_extra_info("peername"))
            self.transport.close()


class Listener:
    """Accepts connections for aiohttp's server on its own sockets, within the `[http]` limits.

    asyncio's own accept loop has no connection cap, and out of descriptors it reports every failed
    accept, with a traceback, to the loop's exception handler. Here a connection beyond the cap is
    closed at once (not queued), a share of the descriptors is kept for the daemon's other links,
    accepting pauses while descriptors are short, and each limited state is logged once when it
    begins (`http_accept_limited`) and once when it ends (`http_accept_restored`).
    """

    def __init__(self, server: Callable[[], asyncio.Protocol], cfg: HttpSection) -> None:
        self.server = server
        self.cfg = cfg
        self.socks: list[socket.socket] = []
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.limited: str | None = None  # why connections are refused or not accepted now
        self.refused = 0
        self._resume: asyncio.TimerHandle | None = None

    async def start(self) -> int:
        """Bind and listen on `[http] listen`; the port bound (the first socket's)."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, addr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self.socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self.close()
            raise
        self._watch()
        return int(self.socks[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting; the connections already open are aiohttp's to finish (AppRunner.cleanup)."""
        self._unwatch()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.socks:
            sock.close()
        self.socks = []
        for task in self.tasks:
            task.cancel()

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self.socks:
            loop.remove_reader(sock.fileno())

    def _accept(self, listening: socket.socket) -> None:
        cap, ceiling = descriptor_budget(self.cfg.max_connections)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for descriptors to come back
                self._pause(errno.errorcode.get(err.errno or 0, "accept_failed"))
                return
            if conn.fileno() >= ceiling:
                self._refuse(conn)
                self._pause("descriptors_low")
                return
            if len(self.conns) >= cap:
                self._refuse(conn)
                self._limit("max_connections", cap=cap)
                continue
            # A full house ends when a quarter of it has left, so a flood that takes every freed slot at
            # once does not log an end and a new beginning per connection.
            if self.limited is not None and (self.limited != "max_connections" or len(self.conns) < cap * 3 // 4):
                log.info("http_accept_restored", after=self.limited, refused=self.refused, open=len(self.conns))
                self.limited = None
                self.refused = 0
            self._admit(conn)

    def _refuse(self, conn: socket.socket) -> None:
        conn.close()
        self.refused += 1

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        guard = _Conn(self, self.server())
        self.conns.add(guard)
        task = asyncio.get_running_loop().create_task(self._serve(conn, guard))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _serve(self, conn: socket.socket, guard: _Conn) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: guard, conn)
        except Exception as err:  # the peer went away before its transport was set up
            log.debug("http_connection_setup_failed", error=str(err))
            self.conns.discard(guard)
            conn.close()

    def _limit(self, reason: str, **fields: Any) -> None:
        if self.limited != reason:
            self.limited = reason
            log.warning("http_accept_limited", reason=reason, open=len(self.conns), **fields)

    def _pause(self, reason: str) -> None:
        """Stop accepting for a while; the backlog waits in the kernel meanwhile."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._limit(reason, nofile=soft)
        self._unwatch()
        if self._resume is None:
            self._resume = asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        """Accept again once descriptors are back below the ceiling; look again later otherwise."""
        self._resume = None
        if not self.socks:
            return
        if _descriptors_in_use() >= descriptor_budget(self.cfg.max_connections)[1]:
            self._resume = asyncio.get_running_loop().call_later(ACCEPT_RETRY_S, self._resume_accepting)
            return
        self._watch()


class HttpServer:
    """An aiohttp application served on a `Listener`: started, stopped and restarted with the API."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.listener: Listener | None = None
        self.port: int | None = None

    async def start(self, app: web.Application, cfg: HttpSection) -> int:
        """Serve `app` on `[http] listen`; the port bound. OSError (a taken port) leaves nothing open."""
        self.runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=cfg.idle_timeout_s,
            logger=_server_log,
        )
        await self.runner.setup()
        assert self.runner.server is not None
        self.listener = Listener(self.runner.server, cfg)
        try:
            self.port = await self.listener.start()
        except OSError:
            await self.stop()
            raise
        cap, _ = descriptor_budget(cfg.max_connections)
        log.info(
            "http_listening",
            host=cfg.host,
            port=self.port,
            max_connections=cap,
            header_timeout_s=cfg.header_timeout_s,
            idle_timeout_s=cfg.idle_timeout_s,
        )
        return self.port

    async def stop(self) -> None:
        """Stop listening and close the connections."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

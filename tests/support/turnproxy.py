"""A delaying TCP proxy that counts each connection's round trips as the wire shows them.

    with TurnProxy(upstream=(dovecot.host, dovecot.port), delay=0.02) as proxy:
        ...  # connect to proxy.port; then proxy.turns() == [3] for one no-change poll

Like ../shared/bench/latency_proxy.py it adds `delay` to every chunk each way (a round trip
costs twice that), so what the client waits for and what it merely sent are told apart by
time. A connection's turns: one for opening it (the connect, with the greeting the server
sends unasked), then one for each burst of client bytes the server answered before the client
sent more or closed. A command the client sends and closes after (a LOGOUT not waited for)
costs no turn; pipelined commands sent together cost one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

HOST = "127.0.0.1"
CHUNK = 65536
CONTROL_TIMEOUT = 5.0
T = TypeVar("T")


@dataclass
class _Conversation:
    """One connection's count: `waiting` while client bytes are still unanswered."""

    turns: int = 1
    waiting: bool = False
    open: bool = True


class TurnProxy:
    """The proxy: `start()` (or `with`) listens on 127.0.0.1; `turns()` lists each connection's."""

    def __init__(self, *, upstream: tuple[str, int], delay: float = 0.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self._conversations: list[_Conversation] = []
        self._lock = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> TurnProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, HOST, 0))
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)

    def __enter__(self) -> TurnProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def turns(self, *, timeout: float = CONTROL_TIMEOUT) -> list[int]:
        """Each connection's turns, once every connection so far has ended."""
        with self._lock:
            if not self._lock.wait_for(
                lambda: not any(c.open for c in self._conversations), timeout
            ):
                raise TimeoutError("a proxied connection is still open")
            return [c.turns for c in self._conversations]

    def clear(self) -> None:
        """Forget the connections counted so far."""
        with self._lock:
            self._conversations.clear()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        conversation = _Conversation()
        with self._lock:
            self._conversations.append(conversation)
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            self._ended(conversation)
            return

        def client_sent(data: bytes | None) -> None:
            with self._lock:
                conversation.waiting = data is not None  # a close waits for nothing

        def server_sent(data: bytes | None) -> None:
            with self._lock:
                if data is not None and conversation.waiting:
                    conversation.turns += 1
                    conversation.waiting = False

        await asyncio.gather(
            self._pump(client_r, server_w, client_sent),
            self._pump(server_r, client_w, server_sent),
            return_exceptions=True,
        )
        self._ended(conversation)

    def _ended(self, conversation: _Conversation) -> None:
        with self._lock:
            conversation.open = False
            self._lock.notify_all()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seen: Callable[[bytes | None], None],
    ) -> None:
        """Forward one direction, each chunk `delay` after it arrived; `seen` hears of it at once."""
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if data is None:
                    with contextlib.suppress(OSError):
                        writer.close()
                    return
                writer.write(data)
                with contextlib.suppress(OSError):
                    await writer.drain()

        task = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(CHUNK):
                seen(data)
                queue.put_nowait((loop.time() + self.delay, data))
        except OSError:
            pass
        seen(None)
        queue.put_nowait((loop.time() + self.delay, None))
        await task

"""The tests' fault proxy: the demo's flaky link (demo/faultproxy.py) with every fault and its
counters.

    with FaultProxy(upstream=(dovecot.host, dovecot.port)) as proxy:
        proxy.reset_after(2000, times=2)  # the next two connections break mid-stream
        client = IMAPClient("127.0.0.1", port=proxy.port, ssl=False, timeout=5)

Besides latency and resets: `stall`, `refuse` and `close_after_greeting` (per connection, with
`times=`), `refuse_hard`/`restore` (on the listener at once: connect() is refused until then),
`clear`, and the connection counters that prove limits on concurrency.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from demo import faultproxy
from demo.faultproxy import CONTROL_TIMEOUT, Fault, Plan, _count


class FaultProxy(faultproxy.FaultProxy):
    """The demo's proxy with the faults and counters only tests use."""

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for clients."""
        return self.host, self.port

    # -- counters --------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections accepted so far, refused ones included."""
        with self._lock:
            return self._connections

    @property
    def active(self) -> int:
        """Connections open now (a refused one never counts)."""
        with self._lock:
            return self._active

    @property
    def max_active(self) -> int:
        """The most connections open at once, to prove limits on concurrency."""
        with self._lock:
            return self._max_active

    def reset_counters(self) -> None:
        """Start counting afresh: no connections yet, peak = what is open now."""
        with self._lock:
            self._connections = 0
            self._max_active = self._active

    def wait_idle(self, timeout: float = CONTROL_TIMEOUT) -> None:
        """Wait until no connection is open, since the proxy sees a client's close a bit later."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._active == 0, timeout):
                raise TimeoutError(f"{self._active} proxied connections still open")

    # -- faults ----------------------------------------------------------------------------

    def stall(self, *, after_bytes: int | None = None, times: int | None = None) -> None:
        """Forward the greeting (or `after_bytes` server bytes), then nothing more to the client."""
        self._set(times, fault=Fault("stall", _count(after_bytes)))

    def refuse(self, *, times: int | None = None) -> None:
        """Accept and reset at once: the client connects, then its first read raises a reset."""
        self._set(times, fault=Fault("refuse", 0))

    def close_after_greeting(self, *, times: int | None = None) -> None:
        """Forward the greeting line, then end the connection cleanly (FIN), as a dying server."""
        self._set(times, fault=Fault("close", None))

    def cut(self) -> None:
        """Reset every connection open now (both sides), as a dropped link would."""

        def abort_all() -> None:
            for conn in list(self._conns):
                conn.abort()

        self._call(abort_all)

    def refuse_hard(self) -> None:
        """Stop listening now, so connect() raises ConnectionRefusedError until `restore()`."""
        self._call(self._unlisten)

    def restore(self) -> None:
        """Listen again on the same port after `refuse_hard` (does not clear other faults)."""
        self._call(self._listen)

    def clear(self) -> None:
        """Back to transparent forwarding for new connections: no faults, no latency, listening."""
        with self._lock:
            self._standing = Plan()
            self._pending.clear()
        self.restore()

    def _unlisten(self) -> None:
        """Close the listener; the placeholder keeps the port, so connects are refused."""
        if self._listener is None:
            return
        self._selector.unregister(self._listener)
        self._listener.close()
        self._listener = None

    def _call(self, fn: Callable[[], None]) -> None:
        """Run fn in the loop thread and wait for it, so it is in effect when we return."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            if self._error is not None:
                raise RuntimeError("the fault proxy loop failed") from self._error
            if thread is None:
                raise RuntimeError("the proxy is not started")
            raise RuntimeError("the proxy is closed")
        done = threading.Event()
        self._calls.append((fn, done))
        self._wake()
        if not done.wait(CONTROL_TIMEOUT):
            raise RuntimeError("the fault proxy loop did not answer")


__all__ = ["FaultProxy"]

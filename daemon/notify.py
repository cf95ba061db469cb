"""The systemd notify protocol (sd_notify), spoken directly over the datagram socket systemd hands us.

Why no dependency: the protocol is one ``KEY=VALUE`` datagram per message to the AF_UNIX socket named
in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading ``@``). Outside systemd the
variable is unset and every call is a no-op, so the daemon runs the same in a terminal, in tests and as
a service. Sending never raises into the daemon: a failed send is logged and reported as ``False``.

:class:`WatchdogPinger` sends ``WATCHDOG=1`` from its own thread, but only while a health callable
says the main loop is alive, so a wedged daemon stops pinging and systemd restarts it.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("kbsync.notify")


class Notifier:
    """Sends notify messages to systemd; does nothing when ``NOTIFY_SOCKET`` is unset.

    ``environ`` defaults to ``os.environ``; it is read once, at construction. A new socket is used for
    every message, so one notifier may be shared between threads.
    """

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.address: str | None = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self.address is not None

    def ready(self) -> bool:
        """Start-up is complete (model loaded, API answering): systemd marks the unit active."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status`` (newlines are folded to spaces)."""
        return self.send("STATUS=" + " ".join(text.splitlines()))

    def watchdog(self) -> bool:
        """A keep-alive ping; needed at least every ``WatchdogSec`` when the unit sets one."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun; systemd waits (up to TimeoutStopSec) for the process to exit."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """A configuration reload has begun; send :meth:`ready` again once it is done.

        ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, microseconds) lets systemd match the reload to its request.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when no watchdog applies to this process.

        From ``WATCHDOG_USEC``; ignored when ``WATCHDOG_PID`` names another process (the variables were
        inherited) or when there is no notify socket to ping. Ping at half this interval.
        """
        if not self.enabled or not self._watchdog_usec:
            return None
        if self._watchdog_pid and self._watchdog_pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("notify.bad_watchdog_usec", value=self._watchdog_usec)
            return None
        return usec / 1e6 if usec > 0 else None

    def send(self, *lines: str) -> bool:
        """Send one datagram made of ``lines``; True if sent, False if disabled or the send failed."""
        if self.address is None:
            return False
        message = "\n".join(lines)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(_socket_address(self.address))
                # never block the daemon on a receiver that does not read (its queue holds ~10 datagrams)
                sock.send(message.encode(), socket.MSG_DONTWAIT)
        except OSError as e:
            log.warning("notify.failed", socket=self.address, message=message,
                        error=f"{type(e).__name__}: {e}")
            return False
        return True


class WatchdogPinger:
    """A daemon thread that sends ``WATCHDOG=1`` every ``interval_s`` while ``healthy()`` is True.

    ``interval_s`` defaults to half of :meth:`Notifier.watchdog_interval`; with no watchdog configured
    :meth:`start` does nothing. ``healthy`` should be cheap (e.g. "the main loop ran in the last N
    seconds"); if it returns False or raises, that ping is skipped, so systemd's watchdog fires.
    """

    def __init__(self, notifier: Notifier, healthy: Callable[[], bool], interval_s: float | None = None):
        if interval_s is None:
            timeout = notifier.watchdog_interval()
            interval_s = timeout / 2 if timeout is not None else None
        if interval_s is not None and interval_s <= 0:
            raise ValueError(f"watchdog ping interval must be positive, got {interval_s}")
        self.notifier = notifier
        self.healthy = healthy
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        """True while the ping thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start pinging (once; a second call is a no-op). No-op when no watchdog is configured."""
        if self.interval_s is None or self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="kbsync-watchdog", daemon=True)
        self._thread.start()
        log.info("watchdog.started", interval_s=self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop pinging; returns as soon as the thread has noticed (it waits on an Event, not a sleep)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        assert self.interval_s is not None
        was_healthy = True
        while not self._stop.is_set():
            ok = self._check()
            if ok:
                self.notifier.watchdog()
            if ok and not was_healthy:
                log.info("watchdog.healthy")
            elif was_healthy and not ok:
                log.warning("watchdog.unhealthy", action="pings withheld; systemd will restart the unit")
            was_healthy = ok
            self._stop.wait(self.interval_s)

    def _check(self) -> bool:
        try:
            return bool(self.healthy())
        except Exception as e:  # a broken health check means we cannot vouch for the daemon
            log.warning("watchdog.check_failed", error=f"{type(e).__name__}: {e}")
            return False


def _socket_address(address: str) -> str | bytes:
    """``@name`` is a Linux abstract socket (leading NUL byte); anything else is a filesystem path."""
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address

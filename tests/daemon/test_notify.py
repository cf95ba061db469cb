"""daemon.notify against real AF_UNIX datagram sockets standing in for systemd's notify socket."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest
from structlog.testing import capture_logs

from daemon.notify import Notifier, WatchdogPinger
from tests.conftest import wait_for


class Receiver:
    """A bound SOCK_DGRAM socket that collects what the notifier sends."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def get(self, timeout: float = 30.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        out = []
        self.sock.settimeout(0.0)
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # AF_UNIX paths are limited to 108 bytes
        pytest.skip("tmp_path too long for an AF_UNIX socket")
    rx = Receiver(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield rx
    rx.close()


@pytest.fixture
def abstract_socket(monkeypatch):
    name = f"kbsync-test-{uuid.uuid4().hex}"
    rx = Receiver(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    yield rx
    rx.close()


def test_lifecycle_messages_arrive_in_order_on_a_path_socket(path_socket):
    n = Notifier()
    assert n.enabled
    assert n.ready() and n.status("HEAD v3, 2 pending") and n.watchdog() and n.stopping()
    assert [path_socket.get() for _ in range(4)] == [
        "READY=1", "STATUS=HEAD v3, 2 pending", "WATCHDOG=1", "STOPPING=1"]
    assert path_socket.drain() == []


def test_lifecycle_messages_arrive_on_an_abstract_socket(abstract_socket):
    n = Notifier()
    n.ready()
    n.status("idle")
    n.watchdog()
    n.stopping()
    assert [abstract_socket.get() for _ in range(4)] == ["READY=1", "STATUS=idle", "WATCHDOG=1", "STOPPING=1"]


def test_status_is_folded_to_one_line(path_socket):
    Notifier().status("HEAD v1\npending 0")
    assert path_socket.get() == "STATUS=HEAD v1 pending 0"


def test_reloading_carries_the_monotonic_clock(path_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_socket.get().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_without_notify_socket_everything_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier()
    assert not n.enabled
    with capture_logs() as logs:
        assert not any([n.ready(), n.status("x"), n.watchdog(), n.stopping(), n.reloading()])
    assert logs == []
    assert n.watchdog_interval() is None


def test_an_unreachable_socket_is_logged_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    with capture_logs() as logs:
        assert Notifier().ready() is False
    assert [e["event"] for e in logs] == ["notify.failed"]
    assert logs[0]["message"] == "READY=1" and "FileNotFoundError" in logs[0]["error"]


def test_environ_is_read_from_the_mapping_given(path_socket):
    n = Notifier({"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "3000000"})
    assert n.watchdog_interval() == 3.0


@pytest.mark.parametrize("usec, pid, expected", [
    ("4000000", None, 4.0),
    ("4000000", "self", 4.0),
    ("4000000", "other", None),
    ("0", None, None),
    ("soon", None, None),
    (None, None, None),
])
def test_watchdog_interval(usec, pid, expected):
    env = {"NOTIFY_SOCKET": "@x"}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = str(os.getpid() if pid == "self" else os.getpid() + 1)
    assert Notifier(env).watchdog_interval() == expected


class Health:
    """A health check the test switches, counting the checks that answered each way."""

    def __init__(self):
        self.ok = True
        self.answers = {True: 0, False: 0}
        self.lock = threading.Lock()

    def __call__(self) -> bool:
        with self.lock:
            ok = self.ok
            self.answers[ok] += 1
            return ok

    def count(self, ok: bool) -> int:
        with self.lock:
            return self.answers[ok]


def test_pinger_pings_while_healthy_and_stops_when_not(path_socket):
    health = Health()
    pinger = WatchdogPinger(Notifier(), health, interval_s=0.05)
    pinger.start()
    try:
        assert [path_socket.get(timeout=30) for _ in range(3)] == ["WATCHDOG=1"] * 3
        with health.lock:
            health.ok = False                                 # the main loop is wedged
        wait_for(lambda: health.count(False) >= 1, what="an unhealthy check")
        path_socket.drain()                                   # a ping sent before that check may have landed
        wait_for(lambda: health.count(False) >= 4, what="three more unhealthy checks")
        assert path_socket.drain() == []
        assert pinger.alive  # still watching: pings resume if the loop recovers
        with health.lock:
            health.ok = True
        assert path_socket.get(timeout=30) == "WATCHDOG=1"
    finally:
        pinger.stop()
    assert not pinger.alive


def test_pinger_treats_a_raising_health_check_as_unhealthy(path_socket):
    def broken() -> bool:
        raise RuntimeError("loop state unknown")

    with capture_logs() as logs:
        pinger = WatchdogPinger(Notifier(), broken, interval_s=0.05)
        pinger.start()
        wait_for(lambda: sum(e["event"] == "watchdog.check_failed" for e in logs) >= 3, what="three failed checks")
        pinger.stop()
    assert path_socket.drain() == []
    assert "watchdog.check_failed" in {e["event"] for e in logs}


def test_pinger_defaults_to_half_the_watchdog_and_stops_promptly(path_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", str(60_000_000))
    pinger = WatchdogPinger(Notifier(), lambda: True)
    assert pinger.interval_s == 30.0
    pinger.start()
    assert path_socket.get() == "WATCHDOG=1"  # the first ping goes out at once
    t = time.perf_counter()
    pinger.stop()
    assert time.perf_counter() - t < 10.0 and not pinger.alive   # not the 30 s interval: stop wakes the wait


def test_pinger_without_a_watchdog_does_nothing(path_socket, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    pinger = WatchdogPinger(Notifier(), lambda: True)
    pinger.start()
    assert pinger.interval_s is None and not pinger.alive
    pinger.stop()
    assert path_socket.drain() == []


def test_a_full_receiver_queue_never_blocks_the_sender(tmp_path, monkeypatch):
    import socket as _socket
    import time as _time

    from daemon.notify import Notifier as _Notifier

    path = str(tmp_path / "full.sock")
    receiver = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    receiver.bind(path)
    try:
        n = _Notifier({"NOTIFY_SOCKET": path})
        t = _time.monotonic()
        results = [n.status(f"line {i}") for i in range(200)]          # far more than the queue holds
        assert _time.monotonic() - t < 20                                # a blocking send would hang
        assert results[0] is True and results[-1] is False             # later ones dropped, not blocked
    finally:
        receiver.close()

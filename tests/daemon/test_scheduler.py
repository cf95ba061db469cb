"""daemon.scheduler with a real BackgroundScheduler, short intervals and counting tick functions."""
from __future__ import annotations

import threading
import time
from datetime import timedelta
from collections.abc import Callable, Iterator

import pytest
from structlog.testing import capture_logs

from daemon.scheduler import SyncScheduler, TickRecord
from tests.conftest import wait_for

HOUR = 3600.0


class Counter:
    """A tick function that counts calls, optionally sleeps or blocks, and tracks concurrency."""

    def __init__(self, sleep_s: float = 0.0, gate: threading.Event | None = None):
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.sleep_s = sleep_s
        self.gate = gate
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls += 1
            n = self.calls
        self.entered.set()
        try:
            if self.gate is not None:
                self.gate.wait(60)
            time.sleep(self.sleep_s)
            return n
        finally:
            with self._lock:
                self.active -= 1


def wait_until(cond: Callable[[], bool], timeout: float = 60.0) -> bool:
    """True once ``cond()`` holds; the deadline only bounds a broken test (slow machines pass)."""
    try:
        return bool(wait_for(cond, timeout=timeout, step=0.01))
    except AssertionError:
        return False


def quiet(s: SyncScheduler) -> bool:
    """No tick runs and none is asked for: with the time trigger an hour away, nothing more can happen."""
    return not s.busy and s.requested is None


@pytest.fixture
def make() -> Iterator[Callable[..., SyncScheduler]]:
    """Build schedulers and make sure every one is shut down after the test."""
    made: list[SyncScheduler] = []

    def _make(tick, **kw) -> SyncScheduler:
        s = SyncScheduler(tick, **kw)
        made.append(s)
        return s

    yield _make
    for s in made:
        s.shutdown(wait=False)


def test_interval_ticks_repeatedly_and_records_the_last(make):
    tick = Counter()
    with capture_logs() as logs:
        s = make(tick, interval_s=0.1)
        s.start()
        assert s.running
        # the third call has returned and been recorded only once its tick.done is logged
        assert wait_until(lambda: sum(e["event"] == "tick.done" for e in list(logs)) >= 3)
    rec = s.last_tick
    assert isinstance(rec, TickRecord) and rec.ok and rec.reason == "schedule"
    assert isinstance(rec.result, int) and rec.duration_s >= 0 and rec.started_at <= time.time()
    events = [e["event"] for e in logs]
    assert events.count("tick.start") >= 3 and events.count("tick.done") >= 3
    assert all("duration_s" in e for e in logs if e["event"] == "tick.done")


def test_ticks_never_overlap_even_when_run_now_is_hammered(make):
    tick = Counter(sleep_s=0.05)
    s = make(tick, interval_s=0.03, pending=lambda: 100, batch_size=1, size_poll_s=0.02)
    t0 = time.monotonic()
    s.start()
    deadline = t0 + 60

    def hammer() -> None:                          # until at least 4 ticks ran, however slow the machine
        while tick.calls < 4 and time.monotonic() < deadline:
            s.run_now()
            time.sleep(0.001)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.shutdown(wait=True)
    elapsed = time.monotonic() - t0
    assert tick.max_active == 1
    assert 4 <= tick.calls <= elapsed / 0.05 + 1  # back to back at most, never in parallel


def test_requests_during_a_tick_coalesce_into_one_follow_up(make):
    gate = threading.Event()
    tick = Counter(gate=gate)
    s = make(tick, interval_s=HOUR)
    s.start()
    s.run_now()
    assert tick.entered.wait(60) and s.busy
    for _ in range(50):
        s.run_now()
    gate.set()
    assert wait_until(lambda: tick.calls == 2 and quiet(s))
    assert tick.calls == 2 and tick.max_active == 1
    assert s.last_tick is not None and s.last_tick.reason == "manual"


def test_run_now_can_wait_for_its_result(make):
    tick = Counter(sleep_s=0.05)
    s = make(tick, interval_s=HOUR)
    s.start()
    rec = s.run_now(wait=True, timeout=60)
    assert rec is not None and rec.reason == "manual" and rec.result == 1


def test_size_trigger_runs_early_once_a_batch_is_pending(make):
    waiting, polls = [3], []
    tick = Counter()

    def pending() -> int:
        polls.append(1)
        return waiting[0]

    s = make(tick, interval_s=HOUR, pending=pending, batch_size=5, size_poll_s=0.05)
    s.start()
    assert wait_until(lambda: len(polls) >= 3)
    assert tick.calls == 0 and quiet(s)  # polled below the batch size: wait for the schedule
    waiting[0] = 5
    assert wait_until(lambda: s.last_tick is not None)    # recorded when the tick returns
    assert tick.calls >= 1 and s.last_tick.reason == "size"


def test_a_raising_tick_is_logged_and_the_schedule_goes_on(make):
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("model worker not ready")
        return "ok"

    with capture_logs() as logs:
        s = make(flaky, interval_s=0.1)
        s.start()
        assert wait_until(lambda: len(calls) >= 4)
    failed = [e for e in logs if e["event"] == "tick.failed"]
    assert len(failed) == 2 and failed[0]["error"] == "RuntimeError: model worker not ready"
    assert failed[0]["log_level"] == "error" and "duration_s" in failed[0]
    assert s.running and s.last_tick is not None and s.last_tick.result == "ok"


def test_failed_tick_is_recorded(make):
    def boom() -> None:
        raise ValueError("bad batch")

    s = make(boom, interval_s=HOUR)
    s.start()
    rec = s.run_now(wait=True, timeout=60)
    assert rec is not None and not rec.ok and rec.error == "ValueError: bad batch" and rec.result is None


def test_shutdown_is_prompt(make):
    gate = threading.Event()
    tick = Counter(gate=gate)
    s = make(tick, interval_s=HOUR)
    s.start()
    s.run_now()
    assert tick.entered.wait(60)
    t = time.perf_counter()
    s.shutdown(wait=False)  # mid-tick: returns without waiting for it (the tick is held for up to 60 s)
    assert time.perf_counter() - t < 30 and not s.running
    gate.set()

    idle = make(Counter(), interval_s=HOUR)
    idle.start()
    t = time.perf_counter()
    idle.shutdown(wait=True)
    assert time.perf_counter() - t < 30 and not idle.running   # not the hour-long interval
    assert idle.run_now() is None  # nothing is scheduled after shutdown


@pytest.mark.parametrize("expr", ["every minute", "* * *", "61 * * * *"])
def test_bad_cron_is_a_clear_value_error(expr):
    with pytest.raises(ValueError, match="bad cron expression") as e:
        SyncScheduler(lambda: None, cron=expr)
    assert repr(expr) in str(e.value)


def test_cron_schedule_and_interval_validation(make):
    s = make(lambda: None, cron="*/5 * * * *")
    assert s.next_run_time is None
    s.start()
    nxt = s.next_run_time
    assert nxt is not None and nxt.minute % 5 == 0 and nxt.second == 0
    with pytest.raises(ValueError, match="interval_s"):
        SyncScheduler(lambda: None, interval_s=None)
    with pytest.raises(ValueError, match="interval_s"):
        SyncScheduler(lambda: None, interval_s=0)


def test_reschedule_changes_the_interval(make):
    tick = Counter()
    s = make(tick, interval_s=HOUR)
    s.start()
    first = s.next_run_time
    assert tick.calls == 0 and quiet(s)
    s.reschedule(interval_s=0.1)
    assert s.next_run_time is not None and s.next_run_time < first
    assert wait_until(lambda: tick.calls >= 2)
    with pytest.raises(ValueError, match="bad cron"):
        s.reschedule(cron="nonsense")
    s.reschedule(cron="0 3 * * *")
    nxt = s.next_run_time
    assert nxt is not None and (nxt.hour, nxt.minute) == (3, 0)


def test_pause_stops_the_triggers_but_not_run_now(make):
    tick = Counter()
    s = make(tick, interval_s=0.1, pending=lambda: 100, batch_size=1, size_poll_s=0.05)
    s.pause()
    s.start()
    assert tick.calls == 0 and s.next_run_time is None and quiet(s)   # paused: no trigger has a next run
    assert s.run_now(wait=True, timeout=60) is not None and tick.calls == 1
    s.reschedule(interval_s=0.05)  # still paused after a reload
    assert s.next_run_time is None and quiet(s) and tick.calls == 1
    s.resume()
    assert wait_until(lambda: tick.calls >= 3)


def test_time_triggers_missed_during_a_long_tick_coalesce_into_one_run(make):
    gate = threading.Event()
    tick = Counter(gate=gate)
    s = make(tick, interval_s=0.05)
    s.start()
    assert tick.entered.wait(60)
    assert wait_until(lambda: s.requested == "schedule")         # a firing while stuck asked for a follow-up
    first = s.next_run_time
    assert wait_until(lambda: s.next_run_time >= first + timedelta(seconds=0.15))   # three more firings passed
    s.reschedule(interval_s=HOUR)
    gate.set()
    assert wait_until(lambda: tick.calls == 2 and quiet(s))
    assert tick.calls == 2 and tick.max_active == 1

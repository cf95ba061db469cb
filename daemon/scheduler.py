"""The sync schedule: when the daemon's tick runs (APScheduler 3.11 ``BackgroundScheduler`` underneath).

Three reasons to tick: a time trigger (an interval, default 60 s, or a crontab line), the size trigger
(a light poll of ``pending()`` that runs the tick early once a full batch of facts waits), and
:meth:`SyncScheduler.run_now` (``kbsync sync``, the admin API). Whatever the reason, ticks never run in
parallel: the APScheduler jobs (``max_instances=1``) only post a request under a lock, and one tick
thread runs the requests; all requests that arrive during a tick coalesce into one follow-up tick.
Missed time triggers (a long tick, a suspended machine) are coalesced into one late run rather than a
burst or a silent drop (``coalesce=True``, ``misfire_grace_time``). The tick thread is a daemon thread,
so a SIGTERM need not wait for a model step to finish (versions are committed atomically elsewhere).

A tick that raises is logged (``tick.failed``) and recorded in :attr:`SyncScheduler.last_tick`; the
schedule goes on.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

log = structlog.get_logger("kbsync.scheduler")

_TICK_JOB, _SIZE_JOB = "kbsync-tick", "kbsync-size"


@dataclass(frozen=True)
class TickRecord:
    """One finished tick: when it started (epoch seconds), how long it took, and what came of it."""

    started_at: float
    duration_s: float
    reason: str               # what asked for it first: "schedule", "size" or "manual"
    result: object = None     # what tick() returned, when it returned
    error: str | None = None  # "ExceptionType: message", when it raised

    @property
    def ok(self) -> bool:
        return self.error is None


class SyncScheduler:
    """Runs ``tick`` on an interval or cron schedule, early when a batch is pending, and on demand.

    ``cron`` (a 5-field crontab line) takes precedence over ``interval_s``. ``pending`` (the number of
    facts waiting) is polled every ``size_poll_s`` seconds; when it reaches ``batch_size`` the tick runs
    at once. Missed runs are coalesced; one that is late by more than ``misfire_grace_s`` is skipped
    (None: never skipped, since a late sync beats none).
    """

    def __init__(self, tick: Callable[[], object], *, interval_s: float | None = 60, cron: str | None = None,
                 pending: Callable[[], int] | None = None, batch_size: int = 10, size_poll_s: float = 2.0,
                 misfire_grace_s: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if size_poll_s <= 0:
            raise ValueError(f"size_poll_s must be positive, got {size_poll_s}")
        self._tick = tick
        self._pending = pending
        self.batch_size = batch_size
        self.size_poll_s = size_poll_s
        self._trigger = _make_trigger(interval_s, cron)
        self._lock = threading.Condition()
        self._busy = False                 # a tick is executing
        self._requested: str | None = None  # the reason for the next tick, if one is asked for
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._paused = False
        self._finished = 0        # ticks completed, for run_now(wait=True)
        self._last: TickRecord | None = None
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=2)},  # jobs only post requests
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": misfire_grace_s},
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the tick thread and the scheduler's time and size jobs (a second call does nothing)."""
        if self.running:
            return
        with self._lock:
            self._stopping = False
        self._worker = threading.Thread(target=self._work, name="kbsync-tick", daemon=True)
        self._worker.start()
        paused = {"next_run_time": None} if self._paused else {}  # a job without a next run is paused
        self._scheduler.add_job(self._request, self._trigger, args=("schedule",), id=_TICK_JOB,
                                name="kbsync tick", replace_existing=True, **paused)
        if self._pending is not None:
            self._scheduler.add_job(self._poll_size, IntervalTrigger(seconds=self.size_poll_s),
                                    id=_SIZE_JOB, name="kbsync size poll", replace_existing=True, **paused)
        self._scheduler.start()
        log.info("scheduler.started", trigger=str(self._trigger), batch_size=self.batch_size,
                 size_trigger=self._pending is not None)

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling. ``wait``: block until a running tick finishes (a tick is never interrupted).

        The tick thread is a daemon thread, so with ``wait=False`` a process may exit mid-tick.
        """
        with self._lock:
            self._stopping = True
            self._requested = None
            self._lock.notify_all()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)  # its jobs only post requests: this is quick
        if wait and self._worker is not None:
            self._worker.join()
        log.info("scheduler.stopped", waited=wait)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`shutdown`."""
        return self._scheduler.running

    @property
    def busy(self) -> bool:
        """True while a tick is executing."""
        return self._busy

    @property
    def requested(self) -> str | None:
        """The reason of the tick asked for and not yet started ("schedule", "size", "manual"), else None."""
        return self._requested

    # -- control -----------------------------------------------------------------------------------

    def run_now(self, wait: bool = False, timeout: float | None = None) -> TickRecord | None:
        """Run the tick as soon as possible.

        If a tick is running, this becomes (at most) one follow-up tick after it, never a parallel one.
        ``wait``: block until a tick that started after this call has finished and return its record
        (None on timeout, or when the scheduler is not running).
        """
        with self._lock:
            if self._stopping:
                return None
            target = self._finished + (2 if self._busy else 1)
            self._request("manual")
            if not wait or not self._scheduler.running:
                return None
            done = self._lock.wait_for(lambda: self._finished >= target or self._stopping, timeout)
            return self._last if done and self._finished >= target else None

    def poke(self) -> None:
        """Changes were committed (e.g. a PostgreSQL NOTIFY): check the size trigger now, not at the next poll."""
        if self.running:
            self._poll_size()

    def pause(self) -> None:
        """Suspend the time and size triggers; :meth:`run_now` still works. A running tick finishes."""
        self._paused = True
        for job_id in (_TICK_JOB, _SIZE_JOB):
            if self._scheduler.get_job(job_id) is not None:
                self._scheduler.pause_job(job_id)
        log.info("scheduler.paused")

    def resume(self) -> None:
        """Re-enable the time and size triggers, from now."""
        self._paused = False
        for job_id in (_TICK_JOB, _SIZE_JOB):
            if self._scheduler.get_job(job_id) is not None:
                self._scheduler.resume_job(job_id)
        log.info("scheduler.resumed", next_run_time=str(self.next_run_time))

    def reschedule(self, interval_s: float | None = None, cron: str | None = None) -> None:
        """Replace the time trigger (config reload); a bad value raises and leaves the old one."""
        trigger = _make_trigger(interval_s, cron)
        self._trigger = trigger
        if self._scheduler.get_job(_TICK_JOB) is not None:
            if self._paused:  # reschedule_job would un-pause; keep the job paused with its new trigger
                self._scheduler.modify_job(_TICK_JOB, trigger=trigger)
            else:
                self._scheduler.reschedule_job(_TICK_JOB, trigger=trigger)
        log.info("scheduler.rescheduled", trigger=str(trigger), next_run_time=str(self.next_run_time))

    # -- state -------------------------------------------------------------------------------------

    @property
    def last_tick(self) -> TickRecord | None:
        """The most recent finished tick, or None before the first."""
        return self._last

    @property
    def next_run_time(self) -> datetime | None:
        """When the time trigger fires next; None when not started or paused."""
        if not self.running:
            return None
        job = self._scheduler.get_job(_TICK_JOB)
        return getattr(job, "next_run_time", None) if job is not None else None

    # -- helpers -----------------------------------------------------------------------------------

    def _request(self, reason: str) -> None:
        """Ask for one tick. Requests made before the tick thread picks one up coalesce into it."""
        with self._lock:
            if self._stopping:
                return
            if self._requested is None:
                self._requested = reason
            self._lock.notify_all()

    def _work(self) -> None:
        """The tick thread: the only place ``tick`` runs, so ticks are serial by construction."""
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._requested is not None or self._stopping)
                if self._stopping:
                    return
                reason, self._requested, self._busy = self._requested, None, True
            record: TickRecord | None = None
            try:
                record = self._tick_once(reason)
            finally:  # one critical section, so run_now(wait=True) never counts a tick twice or not at all
                with self._lock:
                    self._busy = False
                    if record is not None:
                        self._last = record
                        self._finished += 1
                    self._lock.notify_all()

    def _tick_once(self, reason: str) -> TickRecord:
        started, t0 = time.time(), time.perf_counter()
        log.info("tick.start", reason=reason)
        try:
            result = self._tick()
        except Exception as e:  # a failed tick must not stop the schedule
            duration = time.perf_counter() - t0
            error = f"{type(e).__name__}: {e}"
            log.error("tick.failed", reason=reason, error=error, duration_s=round(duration, 3), exc_info=True)
            return TickRecord(started, duration, reason, error=error)
        duration = time.perf_counter() - t0
        log.info("tick.done", reason=reason, duration_s=round(duration, 3), result=result)
        return TickRecord(started, duration, reason, result=result)

    def _poll_size(self) -> None:
        """The size trigger: start a tick early when a full batch is waiting (and none is running)."""
        if self._busy or self._requested is not None or self._pending is None:
            return
        try:
            n = int(self._pending())
        except Exception as e:
            log.warning("pending.failed", error=f"{type(e).__name__}: {e}")
            return
        if n >= self.batch_size:
            log.info("tick.size_trigger", pending=n, batch_size=self.batch_size)
            self._request("size")


def _make_trigger(interval_s: float | None, cron: str | None) -> BaseTrigger:
    """A CronTrigger from a crontab line (preferred when given), else an IntervalTrigger."""
    if cron is not None:
        try:
            return CronTrigger.from_crontab(cron)
        except (ValueError, TypeError) as e:
            raise ValueError(f"bad cron expression {cron!r}: {e}; expected 5 fields "
                             f"'minute hour day month day_of_week', e.g. '*/5 * * * *'") from e
    if interval_s is None or interval_s <= 0:
        raise ValueError(f"give a positive interval_s or a cron expression (got interval_s={interval_s!r})")
    return IntervalTrigger(seconds=interval_s)

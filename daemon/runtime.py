"""The daemon's runtime: the service, the drop folder, the sync schedule and systemd notifications, together.

One lock serialises all model work (queries, sync ticks, rollback, revert, and every batch the serving
API decodes): the live model is single threaded, and a query waits while a step computes, so it never
sees a half-applied step; a served batch holds the lock from reading HEAD to its last token, so an answer
never mixes two versions. Reads that need no model (status, log) do not take it, so they answer during a
step.

Lifecycle (driven by ``daemon.http.server``): :meth:`Runtime.start` loads the model and its key statistics,
then starts the drop folder, the scheduler and the watchdog pinger; :meth:`Runtime.ready` (once the API
answers) writes ``<state>/daemon.json`` and sends READY=1; :meth:`Runtime.stop` stops everything, sends
STOPPING=1, removes ``daemon.json`` and closes the service, unless a step is still computing: then the
step is abandoned uncommitted (a version commit is atomic) and :attr:`Runtime.abandoned` tells the caller
to exit without waiting for it.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from kb import DropFolder
from kb.listen import ChangeListener

from .batcher import Batcher, Job
from .config import AppConfig, ConfigError
from editor.decoding import decode
from .metrics import Metrics
from .notify import Notifier, WatchdogPinger
from .scheduler import SyncScheduler, TickRecord
from .service import Service

log = structlog.get_logger("kbsync.runtime")

DAEMON_FILE = "daemon.json"
HEALTHY_WITHIN_S = 30.0      # the main loop must have beaten this recently for WATCHDOG=1 pings


class Runtime:
    """Everything the running daemon owns, around one :class:`~daemon.service.Service`.

    ``interval_s``/``cron``/``host``/``port`` override the ``[daemon]`` config (command-line flags);
    ``reload_config`` (SIGHUP) re-reads the config and keeps those overrides.
    """

    def __init__(self, cfg: AppConfig, *, interval_s: float | None = None, cron: str | None = None,
                 host: str | None = None, port: int | None = None, progress: bool = False, preloaded=None,
                 notifier: Notifier | None = None, config_loader: Callable[[], AppConfig] | None = None):
        self.cfg = cfg
        self._overrides = {"interval_s": interval_s, "cron": cron}
        self.host = host or cfg.daemon.host
        self.port = cfg.daemon.port if port is None else port
        self.lock = threading.RLock()
        self.service = Service(cfg, progress=progress, preloaded=preloaded)
        self.metrics = Metrics()
        self.batcher = Batcher(self._serve_batch, cfg.serve.batch_window_ms / 1000, cfg.serve.max_batch)
        self.notifier = notifier or Notifier()
        self.pinger = WatchdogPinger(self.notifier, self.healthy)
        self._config_loader = config_loader
        interval, cron_line = self._schedule(cfg)
        try:
            self.scheduler = SyncScheduler(self._tick, interval_s=interval, cron=cron_line, pending=self._pending,
                                           batch_size=cfg.sync.batch_size)
        except ValueError as exc:
            self.service.close()
            raise ConfigError(f"the sync schedule: {exc}") from None
        self.drops = DropFolder(self.service.store, cfg.state_dir / "inbox", settle_s=cfg.daemon.inbox_settle_s,
                                rescan_s=cfg.daemon.inbox_rescan_s)
        # PostgreSQL: a commit by any client wakes the size trigger at once (None on SQLite: the poll is all).
        self.listener = ChangeListener.for_store(self.service.store, on_change=self.scheduler.poke,
                                                 on_head=self._head_moved)
        self.started_at: float | None = None
        self.compaction: dict = {"running": False}       # the background compaction's state (status shows it)
        self._compaction_thread: threading.Thread | None = None
        self.abandoned = False
        self._beat = time.monotonic()
        self._stopping = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._last_exc: BaseException | None = None

    # -- configuration -------------------------------------------------------------------------------

    @property
    def token(self) -> str:
        """The admin API's bearer token: env ``KBSYNC_TOKEN``, else ``[daemon] token`` ('' = none)."""
        return os.environ.get("KBSYNC_TOKEN") or self.cfg.daemon.admin_token

    @property
    def daemon_file(self) -> Path:
        return self.cfg.state_dir / DAEMON_FILE

    def _schedule(self, cfg: AppConfig) -> tuple[float | None, str | None]:
        """Command-line --cron, else --interval, else config cron, else config interval."""
        if self._overrides["cron"]:
            return None, self._overrides["cron"]
        if self._overrides["interval_s"] is not None:
            return self._overrides["interval_s"], None
        return cfg.daemon.interval_s, cfg.daemon.cron or None

    def reload_config(self) -> None:
        """SIGHUP: re-read the config and apply the new schedule (the model is not reloaded)."""
        if self._config_loader is None:
            log.warning("config.reload_skipped", reason="no config loader")
            return
        self.notifier.reloading()
        try:
            cfg = self._config_loader()
            interval, cron = self._schedule(cfg)
            self.scheduler.reschedule(interval_s=interval, cron=cron)
        except Exception as exc:   # a bad edit must not take the daemon down: keep the old config
            log.error("config.reload_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self.cfg = cfg
            log.info("config.reloaded", interval_s=interval, cron=cron)
        finally:
            self.notifier.ready()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model and its key statistics, then start the drop folder, scheduler and pinger."""
        t = time.perf_counter()
        self.notifier.status("loading the model")
        with self.lock:
            live = self.service.live            # loads the model and restores HEAD
            _ = live.stats                        # key statistics: built or read from the cache
            editor = self.service.is_editor       # edits, or follows the process that holds the editor lock
        self.drops.start()
        self.scheduler.start()
        if self.listener is not None:
            self.listener.start()
        self.pinger.start()
        self.started_at = time.time()
        log.info("runtime.started", seconds=round(time.perf_counter() - t, 2), head=self._head(),
                 role="editor" if editor else "follower")

    def ready(self, port: int | None = None) -> None:
        """The API answers: write ``daemon.json`` (for the CLI) and tell systemd READY=1."""
        if port is not None:
            self.port = port
        if self._stopping.is_set():
            return
        doc = {"host": self.host, "port": self.port, "pid": os.getpid(), "url": self.url,
               "started_at": self.started_at}
        tmp = self.daemon_file.with_name(f".{DAEMON_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.daemon_file)
        self.notifier.ready()
        self.publish_status()
        log.info("runtime.ready", url=self.url, pid=os.getpid())

    def stop(self, timeout: float = 2.0) -> None:
        """Stop scheduling and watching, STOPPING=1, remove ``daemon.json``; close the service if idle.

        Never waits for a step: if the model lock is not free within ``timeout`` the step is abandoned
        (uncommitted) and :attr:`abandoned` is set, so the caller exits without joining it.
        """
        self.begin_stop()
        if self._stopped:
            return
        self._stopped = True
        if self.lock.acquire(timeout=timeout):
            try:
                self.service.close()
            finally:
                self.lock.release()
        else:
            self.abandoned = True
            log.warning("step.abandoned", reason="shutting down mid-step; the step was not committed")
        log.info("runtime.stopped", abandoned=self.abandoned)

    def begin_stop(self) -> None:
        """The quick, non-blocking part of :meth:`stop` (idempotent; safe from any thread)."""
        with self._stop_lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
        self.notifier.stopping()
        self.batcher.stop(ShuttingDownError("the daemon is stopping; the request was not started"))
        self.scheduler.shutdown(wait=False)
        if self.listener is not None:
            self.listener.stop()
        self.pinger.stop()
        try:
            self.drops.stop(timeout=2.0)
        finally:
            self._remove_daemon_file()

    def _remove_daemon_file(self) -> None:
        try:
            if json.loads(self.daemon_file.read_text()).get("pid") == os.getpid():
                self.daemon_file.unlink()
        except (FileNotFoundError, ValueError):
            pass

    # -- health --------------------------------------------------------------------------------------

    def beat(self) -> None:
        """Called by the main loop on every turn."""
        self._beat = time.monotonic()

    def healthy(self) -> bool:
        """The main loop turned recently and we are not shutting down (drives WATCHDOG=1)."""
        return not self._stopping.is_set() and time.monotonic() - self._beat < HEALTHY_WITHIN_S

    @property
    def is_ready(self) -> bool:
        """The model is loaded at HEAD and the scheduler runs (not ready while HEAD cannot be restored)."""
        return (self.service.model_loaded and self.service.degraded is None and self.scheduler.running
                and not self._stopping.is_set())

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # -- operations ----------------------------------------------------------------------------------

    def status(self) -> dict:
        """Service status plus the schedule's last and next tick (no model lock: answers during a step)."""
        last, nxt = self.scheduler.last_tick, self.scheduler.next_run_time
        doc = self.service.status()
        doc["kb"]["listening"] = self.listener is not None and self.listener.listening.is_set()
        return {**doc, "last_tick": _tick_json(last), "compaction": dict(self.compaction),
                "next_tick": nxt.isoformat() if nxt is not None else None,
                "daemon": {"pid": os.getpid(), "url": self.url, "started_at": self.started_at,
                           "ready": self.is_ready, "tick_running": self.scheduler.busy}}

    def sync_now(self, timeout: float | None = None) -> dict:
        """Run a tick now through the scheduler (never overlapping a scheduled one); its step reports."""
        self.service.require_editor()
        record = self.scheduler.run_now(wait=True, timeout=timeout)
        if record is None:
            raise ShuttingDownError("the daemon is stopping (or the sync timed out); nothing was started")
        if record.error is not None:
            exc = self._last_exc
            raise exc if exc is not None else RuntimeError(record.error)
        return {"steps": record.result, "head": self._head()}

    def rollback(self, version_id: int | None, actor: str = "api", reason: str = "") -> dict:
        if version_id is not None:
            self.service.ledger.get(version_id)     # VersionNotFoundError before waiting for the lock
        with self.lock:
            doc = self.service.rollback(version_id, actor=actor, reason=reason)
        self.metrics.rollbacks.inc()
        self.publish_status()
        return doc

    def revert(self, version_id: int, actor: str = "api") -> dict:
        self.service.ledger.get(version_id)
        with self.lock:
            reports = self.service.revert(version_id, actor=actor)
        self.metrics.reverts.inc()
        self.metrics.record_steps(reports)
        self.publish_status()
        return {"steps": [r.to_json() for r in reports], "head": self._head()}

    def compact(self, actor: str = "api") -> dict:
        """Start compacting HEAD's history in the background; its state (``status()["compaction"]``).

        Each step (one branch version, or the final move of HEAD) holds the model lock alone, as a sync step
        does, so requests and syncs go on between them. Starting while one runs returns its state."""
        self.service.require_editor()
        with self._stop_lock:
            if self._stopping.is_set():
                raise ShuttingDownError("the daemon is stopping; no compaction was started")
            if self._compaction_thread is None or not self._compaction_thread.is_alive():
                self.compaction = {"running": True, "started_at": time.time(), "actor": actor, "steps": 0,
                                   "progress": None, "error": None}
                self._compaction_thread = threading.Thread(target=self._compact_loop, args=(actor,),
                                                           name="kbsync-compaction", daemon=True)
                self._compaction_thread.start()
            return dict(self.compaction)

    def _compact_loop(self, actor: str) -> None:
        t = time.perf_counter()
        try:
            while not self._stopping.is_set():
                with self.lock:
                    if self._stopping.is_set():
                        break
                    p = self.service.compact_step(actor)
                self.compaction = {**self.compaction, "steps": self.compaction["steps"] + (p.version is not None),
                                   "progress": p.to_json()}
                if p.finished:
                    break
                time.sleep(0.05)                        # let waiting requests take the lock
        except Exception as exc:                        # the branch so far is committed: a restart resumes it
            self.compaction = {**self.compaction, "error": str(exc)}
            log.error("compaction.failed", error=str(exc))
        finally:
            self.compaction = {**self.compaction, "running": False, "seconds": round(time.perf_counter() - t, 2)}
            if not self._stopping.is_set():
                self.publish_status()

    def query(self, prompts: list[str], max_tokens: int = 16) -> tuple[list[str], int | None]:
        with self.lock:
            return self.service.query(prompts, max_tokens)

    def serve(self, job: Job) -> None:
        """Queue a serving request for the batcher (raises ShuttingDownError once stopping)."""
        self.batcher.submit(job)

    def publish_status(self) -> None:
        """A STATUS= line for ``systemctl status``: HEAD and the pending count."""
        head = self._head()
        self.notifier.status(f"head {head if head is not None else 'base'}, "
                             f"{self.service.store.counts().pending} pending")

    # -- helpers -------------------------------------------------------------------------------------

    def _tick(self) -> list[dict]:
        try:
            with self.lock:
                if not self.service.is_editor:     # another process edits: serve HEAD as it moves
                    self.service.follow()
                    return []
                reports = self.service.sync(actor="daemon")
        except BaseException as exc:
            self._last_exc = exc
            raise
        finally:
            if not self._stopping.is_set():
                self.publish_status()
        self._last_exc = None
        self.metrics.record_steps(reports)
        return [r.to_json() for r in reports]

    def _serve_batch(self, jobs: list[Job]) -> None:
        """The batcher's work: decode ``jobs`` together at HEAD, read under the same lock hold."""
        rows = [row for job in jobs for row in job.rows]
        with self.lock:
            if self._stopping.is_set():
                raise ShuttingDownError("the daemon is stopping; the request was not started")
            em, version = self.service.model_at_head()
            for job in jobs:
                job.on_start(version)
            decode(em, rows)
        self.metrics.batch_size.observe(len(rows))

    def _head_moved(self) -> None:
        """HEAD moved (PostgreSQL NOTIFY, maybe by another process): a tick now serves it (and a follower's
        tick does nothing else). Our own commits and rollbacks notify too; the model is already there."""
        if self.service.served != self._head():
            self.scheduler.run_now()

    def _pending(self) -> int:
        return self.service.store.counts().pending

    def _head(self) -> int | None:
        head = self.service.ledger.head()
        return head.id if head else None


class ShuttingDownError(RuntimeError):
    """The daemon is stopping and takes no new work."""


def _tick_json(record: TickRecord | None) -> dict | None:
    if record is None:
        return None
    return {"started_at": record.started_at, "duration_s": round(record.duration_s, 3), "reason": record.reason,
            "ok": record.ok, "error": record.error}

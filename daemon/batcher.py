"""The serving batcher: one thread that gathers requests arriving close together and decodes them as one.

A request (:class:`Job`) waits at most ``window_s`` for company; a batch holds at most ``max_rows``
sequences (a request is never split, so one larger than that runs alone). ``run`` decodes a batch; it
is called on the batcher thread only, one batch at a time.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from editor.decoding import Continuation

log = structlog.get_logger("kbsync.batcher")

_STOP = object()


@dataclass(eq=False)
class Job:
    """One request's rows; ``on_start(version)`` before its first token, ``on_error(exc)`` if it fails."""

    rows: list[Continuation]
    on_start: Callable[[int | None], None]
    on_error: Callable[[BaseException], None]
    cancelled: bool = False


class Batcher:
    """Collects jobs into batches for ``run``; started on the first :meth:`submit`."""

    def __init__(self, run: Callable[[list[Job]], None], window_s: float, max_rows: int):
        self.run, self.window_s, self.max_rows = run, window_s, max_rows
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped: BaseException | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job`` (raises the stop reason once :meth:`stop` was called)."""
        with self._lock:
            if self._stopped is not None:
                raise self._stopped
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kbsync-batcher", daemon=True)
                self._thread.start()
            self._queue.put(job)

    def stop(self, reason: BaseException) -> None:
        """Take no more jobs; the queued ones fail with ``reason`` (a batch in progress finishes)."""
        with self._lock:
            if self._stopped is not None:
                return
            self._stopped = reason
            self._queue.put(_STOP)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not _STOP:
                job.on_error(reason)

    def _loop(self) -> None:
        held = None
        while True:
            job, held = held if held is not None else self._queue.get(), None
            if job is _STOP:
                return
            batch, rows = [job], len(job.rows)
            deadline = time.monotonic() + self.window_s
            while rows < self.max_rows:
                left = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP or rows + len(nxt.rows) > self.max_rows:
                    held = nxt                         # the next batch starts with it
                    break
                batch.append(nxt)
                rows += len(nxt.rows)
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                self.run(batch)
            except BaseException as exc:               # every job of the batch learns why; the thread goes on
                log.error("batch.failed", jobs=len(batch), error=f"{type(exc).__name__}: {exc}")
                for j in batch:
                    j.on_error(exc)

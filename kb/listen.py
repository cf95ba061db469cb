"""Wake-ups when another client commits changes or moves HEAD: PostgreSQL ``LISTEN kbsync_changes, kbsync_head``.

The facts triggers ``NOTIFY kbsync_changes`` once per transaction that grew the change log, and the ledger's
``head`` table ``NOTIFY kbsync_head`` when HEAD moves; PostgreSQL delivers them when the transaction commits. ``ChangeListener`` holds its own connection, waits on it in a thread and calls
``on_change()`` for each notification (a burst of commits may fold into fewer calls: a call means "look again",
never "exactly this change"). If the connection drops it reconnects, and calls ``on_change()`` once after
reconnecting, since commits in between sent nothing it could hear. The daemon's periodic poll stays as the
safety net. SQLite has no such channel: there ``ChangeListener.for_store`` returns None and the poll is all.

Example::

    listener = ChangeListener.for_store(store, on_change=scheduler.poke, on_head=follow_head)
    if listener:
        listener.start()
    ...
    listener.stop()
"""
from __future__ import annotations

import threading
from collections.abc import Callable


from .logger import get_logger
from .db import CHANGES_CHANNEL, HEAD_CHANNEL, PostgresDatabase, redact

log = get_logger("kbsync.kb")


class ChangeListener:
    """Calls ``on_change()`` from its own thread whenever a commit grows the change log (``on_head()`` when one
    moves HEAD, if given)."""

    def __init__(self, db: PostgresDatabase, on_change: Callable[[], object], *,
                 on_head: Callable[[], object] | None = None, retry_s: float = 1.0):
        self.db, self.retry_s = db, retry_s
        self._callbacks = {CHANGES_CHANNEL: on_change, **({HEAD_CHANNEL: on_head} if on_head else {})}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn = None
        self.listening = threading.Event()        # set while LISTEN is in effect (tests and status wait on it)

    @classmethod
    def for_store(cls, store, on_change: Callable[[], object], **kwargs) -> ChangeListener | None:
        """A listener for this store's database, or None where the backend has no notifications (SQLite)."""
        return cls(store.db, on_change, **kwargs) if isinstance(store.db, PostgresDatabase) else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kbsync-listen", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None:
            try:
                conn.cancel_safe()                 # wakes the blocking wait at once
            except Exception:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                self._conn = self.db.connect()
                for channel in self._callbacks:
                    self._conn.execute(f"LISTEN {channel}")
                self.listening.set()
                log.info("kb.listening", channels=list(self._callbacks), url=redact(self.db.url))
                if not first:
                    for channel in self._callbacks:
                        self._fire(channel)        # commits while we were away sent nothing we heard
                first = False
                while not self._stop.is_set():
                    for note in self._conn.notifies(timeout=0.25, stop_after=1):
                        self._fire(note.channel)
            except Exception as e:
                self.listening.clear()
                if self._stop.is_set():
                    break
                log.warning("kb.listen_lost", error=f"{type(e).__name__}: {e}", retry_s=self.retry_s)
                self._stop.wait(self.retry_s)
            finally:
                self.listening.clear()
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except Exception:
                        pass
                    self._conn = None

    def _fire(self, channel: str) -> None:
        try:
            self._callbacks[channel]()
        except Exception as e:                     # the callback's failure must not end the listening
            log.warning("kb.listen_callback_failed", error=f"{type(e).__name__}: {e}")


"""The drop folder: fact files put into ``inbox/`` are ingested exactly once, whole or not at all.

watchdog reports files as they appear (created, written, renamed into place); a periodic rescan catches
whatever it missed. A file is taken only once its size, mtime and inode have stayed the same for
``settle_s`` seconds, so slow writers and files copied in pieces are read complete. Temporary and editor
files (``.*``, ``*~``, ``*.swp``, ``*.tmp``, ``*.part``, ``#*#`` ...) are ignored.

Crash safety: the import (facts and the file's sha256) commits in one transaction *before* the file is moved
to ``processed/``; after a crash, a file whose sha256 is recorded is only moved. A bad file goes to
``rejected/`` next to ``NAME.error.json``, which names every bad record.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from .logger import get_logger
from .errors import InvalidFactsError
from .facts import FactStore
from .records import BadRecord, ImportResult
from .validation import now_iso, parse_fact_file

log = get_logger("kbsync.kb")

IGNORED = (".*", "*~", "*.swp", "*.swo", "*.swx", "*.tmp", "*.temp", "*.part", "*.partial", "*.crdownload",
           "*.download", "#*#", "*.error.json")


@dataclass(frozen=True)
class DropOutcome:
    """What became of one dropped file: ``processed``, ``duplicate`` (bytes seen before) or ``rejected``."""

    name: str
    status: Literal["processed", "duplicate", "rejected"]
    moved_to: Path
    sha256: str
    result: ImportResult | None = None
    problems: tuple[BadRecord, ...] = ()


class DropFolder:
    """Watches ``inbox`` and imports each complete fact file into ``store``.

    ``start()``/``stop()`` run the watcher and a worker thread; ``scan_once()`` does one synchronous pass
    (with ``settle_s=0`` it takes every file at once). ``on_outcome`` is called (on the worker thread) after
    each file is dealt with.

    Example::

        drops = DropFolder(store, state_dir / "inbox", settle_s=2, rescan_s=30)
        drops.start()
        ...
        drops.stop()
    """

    def __init__(self, store: FactStore, inbox: str | Path, *, settle_s: float = 2.0, rescan_s: float = 30.0,
                 dialect: str | None = None, on_outcome: Callable[[DropOutcome], None] | None = None):
        if settle_s < 0 or rescan_s <= 0:
            raise ValueError(f"settle_s must be ≥ 0 and rescan_s > 0 (got {settle_s}, {rescan_s})")
        self.store, self.inbox = store, Path(inbox)
        self.processed, self.rejected = self.inbox / "processed", self.inbox / "rejected"
        self.settle_s, self.rescan_s, self.dialect, self.on_outcome = settle_s, rescan_s, dialect, on_outcome
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}   # name -> (size, mtime, inode), since
        self._dirty: set[str] = set()
        self._events_lock, self._scan_lock = threading.Lock(), threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Watch the inbox (watchdog) and ingest on a worker thread; the first pass is a full rescan."""
        if self._thread is not None:
            raise RuntimeError("the drop folder is already watched; stop() it first")
        self._ensure_dirs()
        self._stop.clear()
        observer = Observer()
        observer.schedule(_Handler(self._notify), str(self.inbox), recursive=False)
        observer.start()
        self._observer = observer
        self._thread = threading.Thread(target=self._run, name="kb-drops", daemon=True)
        self._thread.start()
        log.info("kb.drops_started", inbox=str(self.inbox), settle_s=self.settle_s, rescan_s=self.rescan_s)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching; a file being imported is finished first."""
        self._stop.set()
        self._wake.set()
        try:
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(timeout)
            if self._thread is not None:
                self._thread.join(timeout)
        finally:
            self._observer, self._thread = None, None
        log.info("kb.drops_stopped", inbox=str(self.inbox))

    def __enter__(self) -> DropFolder:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def scan_once(self) -> list[DropOutcome]:
        """One synchronous pass over the inbox: ingest every file that has settled."""
        self._ensure_dirs()
        return self._process(rescan=True)

    # -- the worker ---------------------------------------------------------------------------------------------

    def _notify(self, name: str) -> None:
        with self._events_lock:
            self._dirty.add(name)
        self._wake.set()

    def _run(self) -> None:
        next_rescan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            rescan = now >= next_rescan
            if rescan:
                next_rescan = now + self.rescan_s
            try:
                self._process(rescan=rescan)
            except Exception:   # keep watching: the next rescan retries whatever failed
                log.exception("kb.drops_pass_failed", inbox=str(self.inbox))
            wait = next_rescan - time.monotonic()
            if self._seen:
                wait = min(wait, max(self.settle_s / 2, 0.02))
            self._wake.wait(max(wait, 0.0))
            self._wake.clear()

    def _process(self, rescan: bool) -> list[DropOutcome]:
        with self._scan_lock:
            with self._events_lock:
                names, self._dirty = self._dirty, set()
            if rescan:
                names |= {e.name for e in os.scandir(self.inbox) if e.is_file(follow_symlinks=False)}
            names |= set(self._seen)
            outcomes = []
            for name in sorted(n for n in names if not ignored(n)):
                if self._stop.is_set() and self._thread is not None:
                    break
                try:
                    outcome = self._consider(name)
                except Exception:
                    self._seen.pop(name, None)
                    log.exception("kb.drop_failed", file=name, retry="at the next rescan")
                    continue
                if outcome is not None:
                    outcomes.append(outcome)
                    self._report(outcome)
            return outcomes

    def _report(self, outcome: DropOutcome) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(outcome)
        except Exception:
            log.exception("kb.drop_callback_failed", file=outcome.name)

    def _consider(self, name: str) -> DropOutcome | None:
        path = self.inbox / name
        try:
            st = path.stat(follow_symlinks=False)
        except FileNotFoundError:
            self._seen.pop(name, None)
            return None
        if not path.is_file():
            return None
        sig, now = (st.st_size, st.st_mtime_ns, st.st_ino), time.monotonic()
        seen = self._seen.get(name)
        if seen is None or seen[0] != sig:
            seen = self._seen[name] = (sig, now)
        if now - seen[1] < self.settle_s:
            return None
        outcome = self._ingest(path, sig)
        if outcome is not None:
            self._seen.pop(name, None)
        return outcome

    def _ingest(self, path: Path, sig: tuple[int, int, int]) -> DropOutcome | None:
        data = path.read_bytes()
        st = path.stat()
        if len(data) != sig[0] or (st.st_size, st.st_mtime_ns, st.st_ino) != sig:
            self._seen.pop(path.name, None)     # still being written: settle again
            return None
        sha = hashlib.sha256(data).hexdigest()
        if self.store.is_ingested(sha):
            dest = _move(path, self.processed, sha)
            log.info("kb.drop_duplicate", file=path.name, sha256=sha, moved_to=str(dest))
            return DropOutcome(path.name, "duplicate", dest, sha)
        try:
            parsed = parse_fact_file(data, str(path), name=path.name, dialect=self.dialect)
            result = self.store.import_parsed(parsed, str(path))
        except InvalidFactsError as e:
            dest = self._reject(path, sha, e.problems)
            log.warning("kb.drop_rejected", file=path.name, problems=len(e.problems), moved_to=str(dest))
            return DropOutcome(path.name, "rejected", dest, sha, problems=e.problems)
        dest = _move(path, self.processed, sha)         # only after the import committed
        status = "duplicate" if result.duplicate else "processed"
        log.info("kb.drop_ingested", file=path.name, facts=result.facts, changes=result.changes, moved_to=str(dest))
        return DropOutcome(path.name, status, dest, sha, result=result)

    def _reject(self, path: Path, sha: str, problems: tuple[BadRecord, ...]) -> Path:
        dest = _destination(self.rejected, path.name, sha)
        report = {"file": path.name, "sha256": sha, "rejected_at": now_iso(), "problems": len(problems),
                  "errors": [p.to_json() for p in problems]}
        _write_atomic(dest.with_name(dest.name + ".error.json"),
                      json.dumps(report, indent=2, ensure_ascii=False).encode())
        return _move(path, self.rejected, sha, dest)

    def _ensure_dirs(self) -> None:
        for d in (self.inbox, self.processed, self.rejected):
            d.mkdir(parents=True, exist_ok=True)


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into names of files that may be worth a look."""

    def __init__(self, notify: Callable[[str], None]):
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("deleted", "opened", "closed_no_write"):
            return
        path = getattr(event, "dest_path", "") or event.src_path
        self._notify(os.path.basename(os.fsdecode(path)))


def ignored(name: str) -> bool:
    """True for temporary and editor files, which are never ingested."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in IGNORED)


def _destination(folder: Path, name: str, sha: str) -> Path:
    dest = folder / name
    n = 0
    while dest.exists() or dest.with_name(dest.name + ".error.json").exists():
        n += 1
        stem, suffix = os.path.splitext(name)
        dest = folder / f"{stem}.{sha[:12]}{'.' + str(n) if n > 1 else ''}{suffix}"
    return dest


def _move(path: Path, folder: Path, sha: str, dest: Path | None = None) -> Path:
    dest = dest or _destination(folder, path.name, sha)
    os.replace(path, dest)     # no directory fsync needed: if a crash undoes the move, the file's sha256 is
    return dest                # recorded and the next pass just moves it again


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

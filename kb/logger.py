"""kb's logger, imported lazily: structlog (and the rich console it brings) loads on the first log call, so a
command that only reads the store (``kbsync log``, ``facts list``) does not pay for it."""
from __future__ import annotations

from collections.abc import Callable

# Called once before the first kb log line, when set: an entry point that defers its logging set-up
# (``daemon.logs.configure_logging_on_first_use``) configures it here, so the first line has its format.
before_first_use: Callable[[], None] | None = None


class LazyLogger:
    """``structlog.get_logger(name)`` on first use."""

    def __init__(self, name: str):
        self._name = name
        self._log = None

    def __getattr__(self, attr: str):
        if self._log is None:
            global before_first_use
            hook, before_first_use = before_first_use, None
            if hook is not None:
                hook()
            import structlog
            self._log = structlog.get_logger(self._name)
        return getattr(self._log, attr)


def get_logger(name: str = "kbsync.kb") -> LazyLogger:
    return LazyLogger(name)

"""structlog set-up, called only by entry points: JSON lines, or a human format on a terminal."""
from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    import structlog          # here, not at the top: `kbsync --help` never configures logging, so never pays for it

    json = (not sys.stderr.isatty()) if json is None else json
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def configure_logging_on_first_use(level: str = "info") -> None:
    """For commands whose every log line comes from ``kb`` (``log``, ``show``, ``facts``): configure logging
    just before kb's first line, so a command that logs nothing never imports structlog."""
    import kb.logger
    kb.logger.before_first_use = lambda: configure_logging(level)

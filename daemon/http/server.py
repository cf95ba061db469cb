"""The foreground daemon (``kbsync run``): uvicorn-style start-up, main loop and shutdown around a Runtime.

Start-up: the runtime loads the model and starts its threads, uvicorn binds and serves the admin API in
the main thread, and only once it accepts connections does the runtime write ``daemon.json`` and send
READY=1. Signals (our handlers, not uvicorn's, so the exit code and deadline are ours):

- SIGTERM or SIGINT: graceful stop; the process exits within :data:`STOP_DEADLINE_S` seconds even in the
  middle of a step (the step is abandoned uncommitted: a version commit is atomic), with exit code 0.
- a second SIGINT: immediate exit (``os._exit``, code 130).
- SIGHUP: reload the config (the schedule), in a thread, without reloading the model.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

import structlog
import uvicorn

from .api import create_app
from ..runtime import Runtime

log = structlog.get_logger("kbsync.server")

STOP_DEADLINE_S = 8.0        # after SIGTERM, force the exit at this point (systemd and the contract: 10 s)
GRACEFUL_S = 2.0             # how long in-flight HTTP requests get to finish


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with the runtime's hooks: ready once serving, a heartbeat per loop turn."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime):
        super().__init__(config)
        self.runtime = runtime

    def capture_signals(self):               # the DaemonServer installs the handlers
        import contextlib
        return contextlib.nullcontext()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else None
            self.runtime.ready(port=port)

    async def on_tick(self, counter: int) -> bool:
        self.runtime.beat()
        return await super().on_tick(counter)


class DaemonServer:
    """Runs ``runtime`` and its admin API in the foreground until a signal stops it."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        app = create_app(runtime)            # fails fast (before the model loads) on an unsafe bind
        config = uvicorn.Config(app, host=runtime.host, port=runtime.port, lifespan="off", log_config=None,
                                access_log=False, timeout_graceful_shutdown=GRACEFUL_S)
        self.server = _Uvicorn(config, runtime)
        self._signals = 0
        self._loading = False
        self._old: dict[int, object] = {}

    def run(self) -> int:
        """Start, serve until stopped, stop. Returns the exit code (0 after a signal-initiated stop)."""
        self._install()
        try:
            self._loading = True
            try:
                self.runtime.start()
            finally:
                self._loading = False
            if not self.server.should_exit:
                self.server.run()
        finally:
            self.runtime.stop()
            self._restore()
        return 0

    # -- signals -------------------------------------------------------------------------------------

    def _install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_stop)
        self._old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hup)

    def _restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_stop(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            if sig == signal.SIGINT:
                _force_exit(130, "second interrupt")
            return
        log.info("daemon.stopping", signal=signal.Signals(sig).name)
        self.server.should_exit = True
        threading.Thread(target=self.runtime.begin_stop, name="kbsync-stop", daemon=True).start()
        timer = threading.Timer(STOP_DEADLINE_S, _force_exit, args=(0, "stop deadline reached"))
        timer.daemon = True
        timer.start()
        if self._loading:
            # still loading the model: nothing to serve and nothing committed mid-way, so leave now
            raise _Abort()

    def _on_hup(self, sig: int, frame: FrameType | None) -> None:
        threading.Thread(target=self.runtime.reload_config, name="kbsync-reload", daemon=True).start()


class _Abort(BaseException):
    """Raised from the signal handler to leave a model load that was interrupted."""


def serve(runtime: Runtime) -> int:
    """Run the daemon in the foreground; the exit code."""
    try:
        code = DaemonServer(runtime).run()
    except _Abort:
        code = 0
    if runtime.abandoned:                    # a step still computes in a thread: do not wait for it
        _force_exit(code, "abandoning the step in flight")
    return code


def _force_exit(code: int, why: str) -> None:
    import os
    log.warning("daemon.exit", code=code, reason=why)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)

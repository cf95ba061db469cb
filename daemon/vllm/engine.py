"""The engine side: between two steps, poll HEAD; when it moved, move every worker to it and drop the KV cache.

A HEAD move is applied before the step that schedules the next tokens: every worker loads the new version
(``collective_rpc``), then the prefix cache is reset with the running requests preempted, so no token is
ever computed from KV states of the old version. The served version is written to a small JSON file the
API server reads for ``system_fingerprint``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from kb.records import version_label

from .versions import VersionSource
from .worker import load_version

log = logging.getLogger("vllm.kbsync")   # under vLLM's logger: its handler and format

POLL_ENV, SERVED_ENV = "KBSYNC_VLLM_POLL_S", "KBSYNC_VLLM_SERVED_FILE"
UNLOADED = "unloaded"


class HeadFollower:
    def __init__(self, core, source: VersionSource, poll_s: float):
        self.core, self.source, self.poll_s = core, source, poll_s
        self.served: int | None | str = UNLOADED
        self._polled = 0.0
        self._failed: int | None | str = UNLOADED      # the HEAD that last failed to load (logged once)

    def before_step(self) -> None:
        now = time.monotonic()
        if (self.served != UNLOADED or self._failed != UNLOADED) and now - self._polled < self.poll_s:
            return
        self._polled = now
        head = self.source.head()
        if head != self.served:
            self.move(head)

    def move(self, head: int | None) -> None:
        t = time.perf_counter()
        try:
            results = self.core.collective_rpc(load_version, args=(head,))
        except Exception as exc:                     # a bad version must not take the engine down
            if self._failed != head:
                log.error("kbsync: cannot serve version %s, still serving %s: %s. Fix it on the kbsync side "
                          "(`kbsync rollback`); the plugin retries every poll", version_label(head),
                          "nothing yet" if self.served == UNLOADED else version_label(self.served), exc)
            self._failed = head
            return
        self._failed = UNLOADED
        if self.served != UNLOADED:
            self.core.reset_prefix_cache(reset_running_requests=True)
        before, self.served = self.served, head
        digest = results[0][1] if results else ""
        path = os.environ.get(SERVED_ENV)
        if path:
            tmp = Path(f"{path}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": head, "label": version_label(head), "digest": digest}))
            os.replace(tmp, path)
        log.info("kbsync: HEAD %s -> %s on %d worker(s) in %.3f s", before, version_label(head), len(results),
                 time.perf_counter() - t)


def follower_for(core) -> HeadFollower | None:
    """The core's follower, made on its first step; None when no kbsync state is configured."""
    follower = getattr(core, "_kbsync_follower", False)
    if follower is False:
        source = VersionSource.from_env()
        follower = HeadFollower(core, source, float(os.environ.get(POLL_ENV, "0.25"))) if source else None
        if follower is None:
            log.warning("kbsync plugin: neither KBSYNC_STATE_DIR nor KBSYNC_KB_URL is set; serving the base model")
        core._kbsync_follower = follower
    return follower

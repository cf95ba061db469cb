"""``register``: the ``vllm.general_plugins`` entry point. vLLM calls it once in each of its processes."""
from __future__ import annotations

import functools
import json
import os
import tempfile

from .engine import SERVED_ENV, follower_for


def register() -> None:
    # Every process vLLM starts after this one inherits where the engine writes the served version.
    os.environ.setdefault(SERVED_ENV, os.path.join(tempfile.gettempdir(), f"kbsync-vllm-{os.getpid()}.json"))
    _follow_head_between_steps()
    _name_the_version_in_answers()


def _follow_head_between_steps() -> None:
    from vllm.v1.engine.core import EngineCore

    for name in ("step", "step_with_batch_queue"):
        inner = getattr(EngineCore, name, None)
        if inner is None or getattr(inner, "_kbsync", False):
            continue

        @functools.wraps(inner)
        def step(self, *args, __inner=inner, **kwargs):
            follower = follower_for(self)
            if follower is not None:
                follower.before_step()
            return __inner(self, *args, **kwargs)

        step._kbsync = True
        setattr(EngineCore, name, step)


def served_label() -> str | None:
    """The label of the version the engine serves now ("v3", "base"), or None before it served any."""
    try:
        with open(os.environ[SERVED_ENV]) as f:
            return json.load(f)["label"]
    except (KeyError, OSError, ValueError):
        return None


def _name_the_version_in_answers() -> None:
    """``system_fingerprint`` of every non-streamed answer: "kbsync-v3" (the served version), as kbsync's
    own server names it ("v3"), prefixed so a client can tell the plugin's answers apart."""
    try:
        from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    except ImportError:
        return
    if isinstance(GenerateBaseServing.__dict__.get("system_fingerprint"), property):
        return

    def get(self):
        label = served_label()
        return f"kbsync-{label}" if label else self.__dict__.get("_vllm_fingerprint")

    def set_(self, value):
        self.__dict__["_vllm_fingerprint"] = value

    GenerateBaseServing.system_fingerprint = property(get, set_)

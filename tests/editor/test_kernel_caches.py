"""The CPU kernel caches are bounded as soon as ``editor`` is imported, and an operator's value wins."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from editor.kernel_caches import CAPACITY, VARIABLES

PROBE = "import os, json, editor; print(json.dumps({k: os.environ.get(k) for k in %r}))" % (VARIABLES,)


def _env_after_import(**preset: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | preset
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_editor_bounds_both_caches():
    assert _env_after_import() == {name: str(CAPACITY) for name in VARIABLES}


def test_a_capacity_in_the_environment_wins():
    got = _env_after_import(LRU_CACHE_CAPACITY="1024")
    assert got == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(CAPACITY), "LRU_CACHE_CAPACITY": "1024"}

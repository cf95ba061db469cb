"""Content-addressed safetensors blobs on disk, written durably and without torch (``safetensors.numpy``).

A blob lives at ``root/<sha[:2]>/<sha>.safetensors`` where ``sha`` is the sha256 of its bytes. Writing goes
to a temporary name in the same directory, is fsynced, renamed into place, and the directory fsynced, so a
crash leaves either no file or the whole file at its address (plus, at most, a temporary file to collect).
The ledger (``kb.ledger``) decides which blobs are referenced; this module only stores bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_BLOB_NAME = re.compile(r"([0-9a-f]{64})\.safetensors")
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\..*\.tmp")


class BlobStore:
    """The blob directory of a ledger."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def put(self, data: bytes) -> tuple[str, Path]:
        """Store ``data`` at its content address (skipped when an intact copy is there); returns (sha, path)."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha)
        if not (self.has(sha, len(data)) and sha256_of(path) == sha):
            _write_durably(path, data)
        return sha, path

    def has(self, sha: str, size: int) -> bool:
        """Whether a file of this size is at ``sha``'s address (renames are atomic: it is the whole blob)."""
        try:
            return self.path(sha).stat().st_size == size
        except OSError:
            return False

    def collect(self, referenced: set[str], *, min_age_s: float = 0.0) -> list[Path]:
        """Remove blobs whose sha is not in ``referenced``, and temporary files older than ``min_age_s``."""
        removed: list[Path] = []
        now = time.time()
        for sub in sorted(self.root.glob("??")) if self.root.is_dir() else []:
            if not sub.is_dir():
                continue
            here = []
            for f in sorted(sub.iterdir()):
                blob = _BLOB_NAME.fullmatch(f.name)
                orphan = blob is not None and blob[1] not in referenced
                if orphan or (_TEMP_NAME.fullmatch(f.name) and _age(f, now) >= min_age_s):
                    f.unlink(missing_ok=True)
                    here.append(f)
            if here:
                _fsync_dir(sub)
            removed += here
        return removed


def serialize(arrays: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with a canonical header, so equal content gives equal bytes (and sha256).

    safetensors writes ``__metadata__`` in hash-map order, which differs between runs; the header is rewritten
    with sorted metadata and the tensors in data order, padded with spaces to 8 bytes as the format allows.
    An empty ``arrays`` gives a valid file holding only the metadata.
    """
    import numpy as np
    import safetensors.numpy
    for name, a in arrays.items():
        if not isinstance(name, str) or not isinstance(a, np.ndarray):
            raise TypeError(f"blob arrays map names to numpy arrays; got {name!r}: {type(a).__name__}")
    raw = safetensors.numpy.save({k: np.ascontiguousarray(a) for k, a in arrays.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: (kv[1]["data_offsets"], kv[0]))
    canonical = {"__metadata__": dict(sorted(header.get("__metadata__", {}).items())), **dict(tensors)}
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n:]


def deserialize(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays and metadata of safetensors bytes (raises ``safetensors.SafetensorError`` / ``ValueError``)."""
    import safetensors.numpy
    arrays = safetensors.numpy.load(data)
    n = int.from_bytes(data[:8], "little")
    return arrays, dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


def sha256_of(path: Path) -> str | None:
    """The sha256 of a file's bytes, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    _make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _make_dirs(d: Path) -> None:
    """Create ``d`` and its missing parents, fsyncing each parent so the new entries survive power loss."""
    missing = []
    while not d.is_dir():
        missing.append(d)
        d = d.parent
    for m in reversed(missing):
        m.mkdir(exist_ok=True)
        _fsync_dir(m.parent)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0

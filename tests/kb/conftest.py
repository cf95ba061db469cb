"""Fixtures for the knowledge-base tests: a real SQLite store in tmp_path, the shared sample data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kb import FactStore

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def store(tmp_path):
    with FactStore(tmp_path / "kb.sqlite") as s:
        yield s


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> Path: text is written as UTF-8 bytes exactly as given (no newline translation)."""
    def _write(name: str, content: str | bytes | list | dict) -> Path:
        path = tmp_path / name
        if isinstance(content, (list, dict)):
            content = json.dumps(content, ensure_ascii=False)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path
    return _write


def fact(i: int | str, target: str = "x", **extra) -> dict:
    return {"subject": f"S{i}", "prompt": f"The thing about S{i} is", "target": target, **extra}


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

"""The layering of the packages, read from the source (docs/architecture.md draws it).

editor and kb never import daemon (nor each other), kb never imports torch; inside daemon the core never imports
its rooms (``daemon.cli``, ``daemon.http``, ``daemon.vllm``), the HTTP room never imports the command line and
the vLLM plugin neither of them. The benchmark (``evaluation``) sits beside the command line: only ``daemon.cli``
imports it, and it imports nothing of the daemon but its core.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved), at any depth of the file (lazy ones too)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]                       # a module's package; an __init__'s is its own
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}      # "from . import x" imports the module x
    return out


def modules(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): imports(p) for p in sorted((ROOT / package).rglob("*.py"))}


def offenders(package: str, forbidden: tuple[str, ...], *, skip: tuple[str, ...] = ()) -> list[str]:
    return [f"{path} imports {m}" for path, found in modules(package).items()
            if not path.startswith(skip)
            for m in sorted(found) if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_editor_imports_neither_kb_nor_daemon():
    assert offenders("editor", ("kb", "daemon", "evaluation")) == []


def test_kb_imports_neither_daemon_nor_editor_nor_torch():
    assert offenders("kb", ("daemon", "editor", "evaluation", "torch")) == []


def test_only_the_command_line_imports_the_benchmark_and_the_benchmark_only_the_daemon_core():
    assert offenders("daemon", ("evaluation",), skip=("daemon/cli/",)) == []
    assert offenders("evaluation", ("daemon.cli", "daemon.http", "daemon.vllm")) == []
    assert "daemon.live_model" in imports(ROOT / "evaluation" / "cli.py")     # the resolver sees it


def test_the_daemon_core_never_imports_its_rooms():
    assert offenders("daemon", ("daemon.cli", "daemon.http", "daemon.vllm"),
                     skip=("daemon/cli/", "daemon/http/", "daemon/vllm/", "daemon/__main__.py")) == []


def test_the_vllm_room_imports_neither_the_http_room_nor_the_command_line():
    assert offenders("daemon/vllm", ("daemon.cli", "daemon.http")) == []


def test_the_http_room_never_imports_the_command_line():
    assert offenders("daemon/http", ("daemon.cli",)) == []


def test_the_resolver_sees_relative_imports():
    """The checks above would pass vacuously if relative imports were not resolved: they are."""
    found = imports(ROOT / "daemon" / "http" / "api.py")
    assert "daemon.runtime" in found and "daemon.http.limits" in found
    assert "daemon.http.server" in imports(ROOT / "daemon" / "cli" / "main.py")

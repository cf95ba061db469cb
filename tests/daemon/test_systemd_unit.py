"""configs/kbsync.service: what the daemon relies on, and `systemd-analyze verify` where it is installed."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "configs" / "kbsync.service"
INSTALLED_KBSYNC = "/opt/kbsync/.venv/bin/kbsync"


def directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) -> values, in order; repeated keys (DeviceAllow=) keep every value."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit() -> dict[tuple[str, str], list[str]]:
    return directives(UNIT.read_text())


def one(unit, key: str, section: str = "Service") -> str:
    values = unit.get((section, key), [])
    assert len(values) == 1, f"{section}.{key}: {values}"
    return values[0]


def test_lifecycle_settings(unit):
    assert one(unit, "Type") == "notify" and one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec") == "120"
    assert one(unit, "Restart") == "on-failure" and one(unit, "RestartSec") == "5"
    assert one(unit, "TimeoutStopSec") == "20" and one(unit, "KillMode") == "mixed"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert "PYTHONUNBUFFERED=1" in unit[("Service", "Environment")]
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_exec_start_follows_the_cli_contract(unit):
    argv = one(unit, "ExecStart").split()
    assert argv[0] == INSTALLED_KBSYNC and argv[-1] == "run"  # global options come before the command
    assert argv[argv.index("--state-dir") + 1] == "/var/lib/kbsync"
    assert argv[argv.index("--config") + 1] == "/etc/kbsync/default.toml"
    assert one(unit, "StateDirectory") == "kbsync"


def test_runs_as_a_fixed_user_in_a_sandbox(unit):
    assert one(unit, "User") == "kbsync" and one(unit, "Group") == "kbsync" and one(unit, "DynamicUser") == "no"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("ProtectControlGroups", "yes"), ("RestrictSUIDSGID", "yes"), ("LockPersonality", "yes"),
                       ("RestrictNamespaces", "yes"), ("SystemCallArchitectures", "native")]:
        assert one(unit, key) == value, key


def test_the_sandbox_still_reaches_an_nvidia_gpu(unit):
    assert ("Service", "PrivateDevices") not in unit  # would hide /dev/nvidia*
    assert ("Service", "MemoryDenyWriteExecute") not in unit  # would break PyTorch JIT
    allowed = set(unit[("Service", "DeviceAllow")])
    needed = {"/dev/nvidiactl rw", "/dev/nvidia0 rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw",
              "char-nvidia-frontend rw", "char-nvidia-uvm rw"}
    assert needed <= allowed
    assert one(unit, "DevicePolicy") == "closed"


def verify(unit_text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on a copy whose ExecStart names an executable that exists here
    (verify fails on a missing binary); return its exit code and the lines it printed about the unit."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    local = Path(sys.prefix) / "bin" / "kbsync"
    exe = str(local) if local.is_file() else shutil.which("true") or "/bin/true"
    copy = tmp_path / "kbsync.service"
    copy.write_text(unit_text.replace(INSTALLED_KBSYNC, exe))
    proc = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [ln for ln in lines if "kbsync.service" in ln]


def test_systemd_analyze_verify_passes_cleanly(tmp_path):
    rc, complaints = verify(UNIT.read_text(), tmp_path)
    assert rc == 0 and complaints == []


def test_verify_check_catches_a_broken_unit(tmp_path):
    """Guards the check above: verify exits 0 on unknown keys, so warnings must be looked at too."""
    broken = UNIT.read_text().replace("WatchdogSec=120", "WatchdogSec=120\nWatchDogSecs=120")
    _, complaints = verify(broken, tmp_path)
    assert any("WatchDogSecs" in ln for ln in complaints)

"""The app config: renamed keys still read under their old names, the [kb] section, clear errors."""
from __future__ import annotations

import pytest

from daemon.config import ConfigError, load_config
from tests.conftest import ROOT

DEFAULT = ROOT / "configs" / "default.toml"


def config(tmp_path, text: str):
    (tmp_path / "config.toml").write_text(text)
    return load_config(DEFAULT, tmp_path)


def test_renamed_daemon_keys_are_read_under_both_names(tmp_path):
    new = config(tmp_path, "[daemon]\nadmin_token = 's3cret'\ninbox_rescan_s = 5\n")
    old = config(tmp_path, "[daemon]\ntoken = 's3cret'\nrescan_s = 5\n")
    assert (new.daemon.admin_token, new.daemon.inbox_rescan_s) == (old.daemon.admin_token, old.daemon.inbox_rescan_s) \
        == ("s3cret", 5)
    with pytest.raises(ConfigError, match="both token and admin_token.*keep admin_token only"):
        config(tmp_path, "[daemon]\ntoken = 'a'\nadmin_token = 'b'\n")


def test_kb_url_default_and_choices(tmp_path, monkeypatch):
    monkeypatch.delenv("KBSYNC_KB_URL", raising=False)
    assert config(tmp_path, "").kb_url == str(tmp_path / "kb.sqlite")
    assert config(tmp_path, "").blob_dir == tmp_path / "versions"
    assert config(tmp_path, "[kb]\nurl = 'postgresql://kb@db/knowledge'\n").kb_url == "postgresql://kb@db/knowledge"
    monkeypatch.setenv("KBSYNC_KB_URL", "sqlite:////srv/kb.sqlite")
    assert config(tmp_path, "[kb]\nurl = 'postgresql://kb@db/knowledge'\n").kb_url == "sqlite:////srv/kb.sqlite"
    with pytest.raises(ConfigError, match="not a database URL.*sqlite:///"):
        config(tmp_path, "[kb]\nurl = 'kb.sqlite'\n")
    with pytest.raises(ConfigError, match="SQLite .* or PostgreSQL"):
        config(tmp_path, "[kb]\nurl = 'mysql://db/kb'\n")

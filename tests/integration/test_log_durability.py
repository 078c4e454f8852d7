"""The log's fsync interval (CDP_NATS_SYNC_INTERVAL) is what the nats-server `cdp up` starts runs with."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from cdp_cli import infra


def _jetstream_config(server: infra.NatsServer) -> dict[str, object]:
    assert server.monitor_url is not None
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as reply:
        return dict(json.load(reply)["jetstream"]["config"])


@pytest.mark.parametrize(("setting", "interval_ns", "always"), [
    (None, 120 * 10**9, False),  # nats-server's own default, written out explicitly
    ("always", None, True),
    ("30s", 30 * 10**9, False),
])
def test_the_sync_interval_reaches_nats_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, interval_ns: int | None, always: bool
) -> None:
    if setting is None:
        monkeypatch.delenv(infra.SYNC_INTERVAL_SETTING, raising=False)
    else:
        monkeypatch.setenv(infra.SYNC_INTERVAL_SETTING, setting)
    server = infra.start_nats(tmp_path / "nats", monitor_port=infra.free_port())
    try:
        config = _jetstream_config(server)
    finally:
        server.stop()
    assert bool(config.get("sync_always")) is always
    if interval_ns is not None:
        assert config["sync_interval"] == interval_ns


def test_cdp_up_passes_the_setting_on_and_refuses_a_bad_one(tmp_path: Path) -> None:
    others = {"CDP_DATABASE_URL": "postgresql://unused/db", "CDP_SMTP_HOST": "127.0.0.1"}
    with infra.servers(tmp_path, {**others, infra.SYNC_INTERVAL_SETTING: "always"}):
        assert 'sync_interval: "always"' in (tmp_path / "nats" / "nats-server.conf").read_text()
    with pytest.raises(infra.InfraError, match="CDP_NATS_SYNC_INTERVAL must be 'always' or a duration"):
        with infra.servers(tmp_path, {**others, infra.SYNC_INTERVAL_SETTING: "sometimes"}):
            pass

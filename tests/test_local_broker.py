"""The local broker provisioning: cache hit without Maven, clean stop."""

from __future__ import annotations

import subprocess

import pytest

from devtools import local_broker
from devtools.local_broker import LocalBroker, fetch_jars


def test_second_fetch_is_a_cache_hit_without_maven(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch_jars()  # the session already has them; make sure of it

    def no_network(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("Maven was called although the cache is complete")

    monkeypatch.setattr(local_broker.subprocess, "run", no_network)
    assert (fetch_jars() / f"kafka_2.13-{local_broker.KAFKA_VERSION}.jar").exists()


@pytest.mark.kafka
def test_broker_starts_answers_and_stops_without_a_stray_jvm(tmp_path) -> None:
    b = LocalBroker(tmp_path / "k")
    try:
        b.start()
        proc = b.proc
        assert proc is not None and proc.poll() is None
        assert b.log_file.exists()
    finally:
        b.stop()  # also when an assertion above failed: no JVM outlives the test
    assert proc.poll() is not None
    ps = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert ps.stdout.strip() == ""

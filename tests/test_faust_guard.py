"""The Faust guard: the workarounds in app/faust_guard.py are tied to one faust-streaming release.

A version bump has to revisit them (the pin test fails first), and a worker on a Faust they do not
fit refuses to start with one line instead of failing inside a rebalance later.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import faust
import pytest
from faust.transport.consumer import Consumer

from app import faust_guard
from app.faust_guard import WRITTEN_FOR, FaustGuardError

ROOT = Path(__file__).resolve().parent.parent


def _app() -> faust.App:
    # No broker is contacted: the consumer object exists before the worker starts it.
    return faust.App("guard-test", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False)


def test_the_pin_is_the_release_the_workarounds_were_written_for() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    faust_pins = [d for d in deps if d.replace(" ", "").startswith("faust-streaming")]
    # Changing this pin means revisiting every workaround in app/faust_guard.py, then WRITTEN_FOR.
    assert faust_pins == [f"faust-streaming=={WRITTEN_FOR}"]
    assert faust_guard.installed_version() == WRITTEN_FOR


def test_the_installed_faust_passes_the_check() -> None:
    faust_guard.check(_app())  # every private in PRIVATES exists


def test_a_missing_private_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Consumer, "_new_offset")  # as if upstream renamed it
    with pytest.raises(FaustGuardError) as info:
        faust_guard.check(_app())
    message = str(info.value)
    assert "faust.transport.consumer.Consumer._new_offset" in message and "\n" not in message


def test_a_worker_on_another_faust_refuses_to_start_with_one_line() -> None:
    code = (
        "import app.faust_guard as g; g.installed_version = lambda: '0.16.0'; "
        "from app.cli import main; main(['worker', '--no-apply-topics'])"
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "WEBHOOKS_ADMIN_INSECURE": "true",
        "WEBHOOKS_TOPIC_PREFIX": "guard-test.",
    }
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert res.returncode == 1, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, res.stderr
    assert "faust-streaming 0.16.0 is installed" in lines[0] and WRITTEN_FOR in lines[0]

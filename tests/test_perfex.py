"""The Perfex CRM module (connectors/perfex): its hook map comes from the catalog, its PHPUnit tests
pass, and its PHP code, run by `php` in the harness, posts change events to a real worker whose
signed deliveries arrive, also after the worker was down (the spool); plus batch ingest on
`POST /api/events`, which the module uses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from app.config import Settings
from app.signing import verify_hex
from tests.receiver import Receiver
from tests.workers import TOKEN, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
CONNECTOR = ROOT / "connectors" / "perfex"
RUN = CONNECTOR / "tests" / "harness" / "run.php"
INSTALL = "scripts/bootstrap (apt-get install php-cli php-curl php-sqlite3 phpunit)"


def need(tool: str) -> str:
    """The tool's path; a missing one fails under CI (bootstrap installs it) and skips locally."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed: {INSTALL}")
        pytest.skip(f"{tool} is not installed: run {INSTALL}")
    return path


# ---- no broker ---------------------------------------------------------------------------------------
def test_hook_map_is_generated_from_the_catalog() -> None:
    from app.catalog import load_catalog
    from connectors.perfex.generate_hook_map import main, parse_hook

    assert main(["--check"]) == 0, "hook_map.php is stale: run python connectors/perfex/generate_hook_map.py"
    # Every catalog event is either sent (on the hooks its perfex_hook names) or listed as not sent.
    php = (CONNECTOR / "perfex_webhooks" / "hook_map.php").read_text(encoding="utf-8")
    for name, ev in load_catalog().events.items():
        listener = parse_hook(ev.perfex_hook)
        assert f"'{name}' => " in php
        if listener is not None:
            assert all(hook in ev.perfex_hook for hook in listener["hooks"])
    assert parse_hook("derived: invoice_status_changed status=2") == {
        "hooks": ["invoice_status_changed"],
        "before": None,
        "where": {"status": "2"},
        "changed": None,
    }
    assert parse_hook("derived: ticket_settings_updated original.priority != data.priority") == {
        "hooks": ["ticket_settings_updated"],
        "before": None,
        "where": {},
        "changed": "priority",
    }
    assert parse_hook("before_client_deleted / after_client_deleted")["before"] == "before_client_deleted"  # type: ignore[index]
    assert parse_hook("synthetic: daily scan") is None


def test_module_unit_tests_pass_under_phpunit() -> None:
    phpunit = need("phpunit")
    need("php")
    res = subprocess.run(
        [phpunit, "-c", str(CONNECTOR / "tests" / "phpunit.xml")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK (" in res.stdout, res.stdout


def test_every_php_file_of_the_module_parses() -> None:
    """Also the parts the harness cannot run (the settings controller and view need a real Perfex)."""
    php = need("php")
    files = sorted((CONNECTOR / "perfex_webhooks").rglob("*.php"))
    assert len(files) >= 10
    for path in files:
        res = subprocess.run([php, "-l", str(path)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stdout + res.stderr


# ---- against a real worker -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(kafka: Any) -> Iterator[SimpleNamespace]:
    from app.topics import apply

    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap,
            "WEBHOOKS_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}.",
        }
    )
    apply(settings)
    receiver = Receiver().start()
    worker = WorkerProcess(settings, name="perfex")
    try:
        worker.start()
        yield SimpleNamespace(settings=settings, receiver=receiver, worker=worker)
    finally:
        worker.stop(timeout=5)
        receiver.stop()


def endpoint(w: WorkerProcess, url: str, events: str) -> dict[str, Any]:
    r = w.api("POST", "/api/endpoints", json={"url": url, "events": events, "mode": "immediate"})
    assert r.status_code == 201, r.text
    return r.json()


def resource(body: dict[str, Any]) -> Any:
    """The delivered resource: `payload` (SPEC 3.2; issue 15 renames the body's `data` to it)."""
    return body["payload"] if "payload" in body else body["data"]


def run_php(scenario: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """One CRM request in the harness: its hooks fire, the module sends (or spools) at the end."""
    php = need("php")
    path = tmp_path / f"scenario-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(scenario), encoding="utf-8")
    res = subprocess.run([php, str(RUN), str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def module_options(w: WorkerProcess) -> dict[str, str]:
    return {"perfex_webhooks_url": w.base, "perfex_webhooks_token": TOKEN, "perfex_webhooks_timeout_ms": "3000"}


@pytest.mark.kafka
def test_batch_ingest_answers_each_item_on_its_own(pipeline: SimpleNamespace) -> None:
    w = pipeline.worker
    ep = endpoint(w, pipeline.receiver.url("/batch"), "item.*")
    batch = [
        {"event": "item.created", "resource_id": "1", "data": {"id": "1", "rate": "9.50"}},
        {"event": "item.nope", "resource_id": "2"},
        "not an object",
        {"event": "item.updated", "resource_id": 1, "id": "evt_batch_3", "data": {"id": "1", "rate": "10.00"}},
        {"event": "item.deleted"},
    ]
    r = w.api("POST", "/api/events", json=batch)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [x["status"] for x in doc["results"]] == [202, 400, 400, 202, 400]
    assert [x["index"] for x in doc["results"]] == [0, 1, 2, 3, 4]
    assert (doc["accepted"], doc["refused"], doc["retry"]) == (2, 3, 0)
    assert "unknown_event" in doc["results"][1]["error"] and "resource_id" in doc["results"][4]["error"]
    assert doc["results"][3]["id"] == "evt_batch_3" and doc["results"][3]["key"] == "item:1"

    got = pipeline.receiver.wait_for(2, "/batch", timeout=30)
    time.sleep(0.5)  # nothing else may follow: the refused items are not delivered
    got = pipeline.receiver.received("/batch")
    assert sorted(x.json["event"] for x in got) == ["item.created", "item.updated"]
    assert all(verify_hex(x.body, x.header("X-PerfexAPI-Signature") or "", [ep["secret"]]) for x in got)

    # Bounds: an empty batch, too many items, a body over the byte limit, a bare string.
    assert w.api("POST", "/api/events", json=[]).status_code == 400
    many = [{"event": "item.created", "resource_id": str(i)} for i in range(501)]
    r = w.api("POST", "/api/events", json=many)
    assert r.status_code == 413 and "500" in r.json()["error"]
    huge = [{"event": "item.created", "resource_id": "1", "data": {"x": "y" * 600_000}}] * 2
    assert w.api("POST", "/api/events", content=orjson.dumps(huge)).status_code == 413
    assert w.api("POST", "/api/events", json="x").status_code == 400


@pytest.mark.kafka
def test_module_sends_crm_hooks_as_signed_deliveries(pipeline: SimpleNamespace, tmp_path: Path) -> None:
    w, receiver = pipeline.worker, pipeline.receiver
    ep = endpoint(w, receiver.url("/crm"), "invoice.*,lead.created")
    invoice = {"id": 19, "status": "2", "total": "21.80", "clientid": "3", "items": [{"description": "Zürich/€ <b>"}]}
    report = run_php(
        {
            "db": str(tmp_path / "crm.sqlite"),
            "options": module_options(w),
            "records": {
                "invoices_model": {"19": invoice},
                "leads_model": {"7": {"id": "7", "name": "Ada", "email": "ada@example.com"}},
            },
            "actions": [
                ["after_invoice_added", [19]],
                ["invoice_status_changed", [{"invoice_id": 19, "status": 2}]],
                ["lead_created", [{"lead_id": 7, "web_to_lead_form": True}]],
            ],
        },
        tmp_path,
    )
    sent = report["queued"]
    assert [(e["event"], e["resource_id"]) for e in sent] == [
        ("invoice.created", "19"),
        ("invoice.status_changed", "19"),
        ("invoice.paid", "19"),
        ("lead.created", "7"),
    ]
    assert report["spool"] == 0, report["log"]

    got = receiver.wait_for(4, "/crm", timeout=30)
    time.sleep(0.5)
    got = receiver.received("/crm")
    assert sorted(x.json["event_id"] for x in got) == sorted(e["id"] for e in sent), "lost or duplicated"
    for x in got:
        assert verify_hex(x.body, x.header("X-PerfexAPI-Signature") or "", [ep["secret"]])
    paid = next(x.json for x in got if x.json["event"] == "invoice.paid")
    # The full resource as the model returned it, values as strings (SPEC 3.1).
    assert resource(paid) == {**invoice, "id": "19"}

    # The settings page's "send test event" button: accepted, and delivered like any event.
    report = run_php(
        {"db": str(tmp_path / "crm.sqlite"), "options": module_options(w), "admin": ["test_event", {"event": "invoice.sent"}]},
        tmp_path,
    )
    [(kind, message)] = report["alerts"]
    assert kind == "success" and "invoice:test" in message, message
    test = receiver.wait_for(5, "/crm", timeout=30)[-1].json
    assert test["event"] == "invoice.sent" and resource(test) == {"id": "test", "perfex_webhooks_test": "1"}


@pytest.mark.kafka
def test_module_spools_while_the_worker_is_down_then_delivers_in_order(
    pipeline: SimpleNamespace, tmp_path: Path
) -> None:
    w, receiver = pipeline.worker, pipeline.receiver
    endpoint(w, receiver.url("/spooled"), "task.updated")
    w.stop(timeout=10)
    db = str(tmp_path / "crm.sqlite")
    sent: list[dict[str, Any]] = []
    logs: list[str] = []
    # Four CRM requests while the pipeline is down, each saving three tasks (seq = save order).
    for request in range(4):
        tasks = {str(t): {"id": str(t), "name": f"task {t}", "seq": str(request * 3 + t)} for t in (1, 2, 3)}
        started = time.monotonic()
        report = run_php(
            {
                "db": db,
                "options": module_options(w),
                "records": {"tasks_model": tasks},
                "actions": [["after_update_task", [t]] for t in (1, 2, 3)],
            },
            tmp_path,
        )
        assert time.monotonic() - started < 10, "a CRM request waited on the pipeline beyond its timeout"
        sent += report["queued"]
        logs += report["log"]
        assert report["spool"] == len(sent), report["log"]
    # The first request found the pipeline down; the next ones did not try again (paused).
    assert sum("events wait in the spool" in line for line in logs) == 1, logs

    w.start()
    report = run_php({"db": db, "options": module_options(w), "cron": True}, tmp_path)  # after_cron_run
    assert report["spool"] == 0, report["log"]

    got = receiver.wait_for(12, "/spooled", timeout=60)
    time.sleep(0.5)
    got = receiver.received("/spooled")
    assert sorted(x.json["event_id"] for x in got) == sorted(e["id"] for e in sent), "lost or duplicated"
    # In order per resource where the module hands over: on crm.events, each task's saves in seq order.
    records = read_events(pipeline.settings, "crm.events", [e["id"] for e in sent])
    for task in ("1", "2", "3"):
        seqs = [int(v["data"]["seq"]) for v in records if v["resource_id"] == task and v["event"] == "task.updated"]
        assert seqs == sorted(seqs) and len(seqs) == 4, (task, seqs)
        delivered = [int(resource(x.json)["seq"]) for x in got if resource(x.json)["id"] == task]
        assert sorted(delivered) == seqs


def read_events(settings: Settings, topic: str, ids: list[str], timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every record on the topic from the beginning, in partition order, until all `ids` are seen."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "perfex-reader", "enable.auto.commit": False})
    name = settings.topic(topic)
    parts = c.list_topics(name, timeout=10).topics[name].partitions
    c.assign([TopicPartition(name, p, 0) for p in parts])
    out: list[dict[str, Any]] = []
    want = set(ids)
    deadline = time.monotonic() + timeout
    try:
        while not want <= {v["id"] for v in out} and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                out.append(orjson.loads(msg.value()))
    finally:
        c.close()
    return [v for v in out if v["id"] in want]
